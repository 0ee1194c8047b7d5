//! Packaging: the systemd unit, the configuration the packages install, the man pages, and the
//! packages `scripts/package` builds.
//!
//! The .deb check inspects the package `ESS_AGENT_DEB` names or, when it is unset, the one
//! `scripts/package --profile dev --deb-only --no-build` made of the binary under test; with
//! neither (or one older than the binary) it fails and says what to run. `scripts/test` builds
//! the .deb and sets the variable. The .rpm check is ignored unless asked for, with
//! `ESS_AGENT_RPM` naming the package.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;
use ess_agent::config::Config;

use crate::support::{self, Agent, SECRET};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The worst `systemd-analyze security` exposure level the unit may have ("OK" is up to 2.0).
const MAX_EXPOSURE: f64 = 2.0;

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether a program can be started (it is on PATH).
fn available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether systemd-analyze is installed. Where scripts/test runs (ESS_AGENT_DEB is set) it must be.
fn systemd_analyze_available() -> bool {
    let yes = available("systemd-analyze", "--version");
    if !yes {
        assert!(
            std::env::var_os("ESS_AGENT_DEB").is_none(),
            "systemd-analyze is not installed (apt-get install systemd): the unit cannot be checked"
        );
        eprintln!("systemd-analyze is not installed: the unit is not checked");
    }
    yes
}

/// Writes `unit` as `ess-agent.service` in `dir`, with `/usr/bin/ess-agent` replaced by `binary`
/// (systemd-analyze verify requires the programs a unit starts to exist).
fn unit_with_binary(dir: &Path, unit: &str, binary: &Path) -> PathBuf {
    let path = dir.join("ess-agent.service");
    let unit = unit.replace("/usr/bin/ess-agent", &binary.display().to_string());
    std::fs::write(&path, unit).unwrap();
    path
}

/// `systemd-analyze verify`: exit 0 and nothing said. (It exits 0 on unknown keys and values it
/// cannot parse, and only warns about them.)
fn assert_unit_verifies(unit: &Path) {
    let out = run(Command::new("systemd-analyze").arg("verify").arg(unit));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{said}",
        unit.display(),
        out.status
    );
}

/// The "Overall exposure level" of `systemd-analyze security --offline=true`.
fn exposure_level(unit: &Path) -> f64 {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "systemd-analyze security printed no exposure level ({}):\n{stdout}{}",
                out.status,
                text(&out.stderr)
            )
        });
    let figure = line.rsplit(':').next().unwrap_or_default();
    figure
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure level in {line:?}"))
}

fn assert_unit_is_hardened(unit: &Path) {
    let level = exposure_level(unit);
    assert!(
        level <= MAX_EXPOSURE,
        "systemd-analyze security rates {} {level}, above {MAX_EXPOSURE}",
        unit.display()
    );
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = read(Path::new(ROOT).join("packaging/ess-agent.service"));
    let path = unit_with_binary(dir.path(), &unit, Path::new(support::binary()));
    assert_unit_verifies(&path);
    // With the credential example in force, as docs/operations.md shows it.
    let with_credential = unit.replace("#LoadCredential=", "LoadCredential=");
    assert_ne!(with_credential, unit);
    let path = unit_with_binary(dir.path(), &with_credential, Path::new(support::binary()));
    assert_unit_verifies(&path);

    // The check does catch a broken unit.
    let broken = unit.replace("Type=notify", "Type=notfy");
    let path = unit_with_binary(dir.path(), &broken, Path::new(support::binary()));
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(text(&out.stderr).contains("notfy"));
}

#[test]
fn the_unit_is_rated_ok_by_systemd_analyze_security() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = read(Path::new(ROOT).join("packaging/ess-agent.service"));
    let path = unit_with_binary(dir.path(), &unit, Path::new(support::binary()));
    assert_unit_is_hardened(&path);

    // The figure is read, not assumed: without the hardening the unit is rated worse.
    let bare: String = unit
        .lines()
        .take_while(|l| !l.starts_with("# Hardening"))
        .chain(["[Install]", "WantedBy=multi-user.target"])
        .map(|l| format!("{l}\n"))
        .collect();
    let path = unit_with_binary(dir.path(), &bare, Path::new(support::binary()));
    assert!(exposure_level(&path) > 5.0);
}

/// The unit says what the packages and the operator's guide rely on.
#[test]
fn the_unit_runs_the_agent_as_its_own_user_with_a_watchdog() {
    let unit = read(Path::new(ROOT).join("packaging/ess-agent.service"));
    for line in [
        "Type=notify",
        "User=ess-agent",
        "Group=ess-agent",
        "ExecStartPre=/usr/bin/ess-agent validate",
        "ExecStart=/usr/bin/ess-agent run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=ess-agent",
        "ConfigurationDirectory=ess-agent",
        "Environment=ESS_AGENT_CONFIG=/etc/ess-agent/ess-agent.toml",
        // journald's default rate limit would drop most access lines under load.
        "LogRateLimitIntervalSec=0",
        // docs/operations.md: secrets as systemd credentials.
        "#LoadCredential=hub-hmac:/etc/ess-agent/secrets/hub-hmac",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
}

/// Lays the packaged configuration out under `root` as the package installs it (every
/// `/etc/ess-agent` and `/var/lib/ess-agent` path moved under `root`); returns its path.
fn install_packaged_config(root: &Path, config: &str, with_secret: bool) -> PathBuf {
    let etc = root.join("etc/ess-agent");
    let var = root.join("var/lib/ess-agent");
    for dir in [&etc.join("adapters"), &etc.join("secrets"), &var] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let text = config
        .replace("/etc/ess-agent", &etc.display().to_string())
        .replace("/var/lib/ess-agent", &var.display().to_string());
    let path = etc.join("ess-agent.toml");
    std::fs::write(&path, text).unwrap();
    if with_secret {
        std::fs::write(etc.join("secrets/hub-secret"), format!("{SECRET}\n")).unwrap();
    }
    path
}

/// `ess-agent validate` with the configuration the package installs: refused without the hub
/// secret (naming the file), good with it.
fn assert_packaged_config_validates(binary: &Path, config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = install_packaged_config(dir.path(), config, false);
    let out = run(Command::new(binary)
        .args(["validate", "--config"])
        .arg(&path));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "validate passed without the secret");
    assert!(
        stderr.contains("secrets/hub-secret"),
        "the refusal does not name the secret file:\n{stderr}"
    );

    std::fs::write(
        dir.path().join("etc/ess-agent/secrets/hub-secret"),
        format!("{SECRET}\n"),
    )
    .unwrap();
    let out = run(Command::new(binary)
        .args(["validate", "--config"])
        .arg(&path));
    assert!(
        out.status.success(),
        "validate refused the packaged configuration with the secret in place:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn the_packaged_config_is_valid() {
    let text = read(Path::new(ROOT).join("packaging/ess-agent.toml"));
    let config = Config::parse(&text).unwrap_or_else(|p| panic!("{}: {}", p.key, p.message));
    assert_eq!(config.validate(), vec![]);
    assert_eq!(config.state_dir, Path::new("/var/lib/ess-agent"));
    assert_eq!(config.adapters_dir, Path::new("/etc/ess-agent/adapters"));
    assert_eq!(
        config.auth.hmac_secrets[0].file.as_deref(),
        Some(Path::new("/etc/ess-agent/secrets/hub-secret"))
    );
    assert!(config.ingress.listen.ip().is_loopback());
    assert!(config.admin.listen.ip().is_loopback());

    // The commented-out example route and sink are valid once uncommented, and their adapter
    // is one of the examples the packages ship.
    let start = text.find("# [[routes]]").expect("an example route");
    let example: String = text[start..]
        .lines()
        .map(|l| l.strip_prefix("# ").or(l.strip_prefix('#')).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let with_route = format!("{}{example}", &text[..start]);
    let config = Config::parse(&with_route).unwrap_or_else(|p| panic!("{}: {}", p.key, p.message));
    assert_eq!(config.validate(), vec![]);
    assert_eq!(config.routes.len(), 1);
    let adapter = Path::new(ROOT)
        .join("adapters")
        .join(&config.routes[0].adapter);
    assert!(adapter.exists(), "{} is not an example", adapter.display());
}

#[test]
fn the_packaged_config_validates_and_runs_once_the_secret_is_in_place() {
    let config = read(Path::new(ROOT).join("packaging/ess-agent.toml"));
    assert_packaged_config_validates(Path::new(support::binary()), &config);

    // And the agent starts with it (listeners moved to free ports).
    let dir = tempfile::tempdir().unwrap();
    let config = config
        .replace("127.0.0.1:8787", "127.0.0.1:0")
        .replace("127.0.0.1:8788", "127.0.0.1:0");
    let path = install_packaged_config(dir.path(), &config, true);
    let agent = Agent::start_config(&path, &[]);
    assert!(agent.ingress.ip().is_loopback());
}

/// The man pages: one for `ess-agent` (with FILES, ENVIRONMENT and SEE ALSO) and one per
/// subcommand, rendered from the command line definition.
fn render_man_pages() -> Vec<(String, Vec<u8>)> {
    fn render(cmd: clap::Command, top: bool, pages: &mut Vec<(String, Vec<u8>)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            render(sub.clone(), false, pages);
        }
        let man = clap_mangen::Man::new(cmd).manual("ess-agent manual");
        let mut page = Vec::new();
        man.render(&mut page).unwrap();
        if top {
            page.extend_from_slice(MAN_EXTRA.as_bytes());
        }
        pages.push((man.get_filename(), page));
    }
    let mut cmd = ess_agent::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    render(cmd, true, &mut pages);
    pages.sort();
    pages
}

const MAN_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/ess\-agent/ess\-agent.toml\fR
The configuration; \fBess\-agent validate\fR checks it.
.TP
\fI/etc/ess\-agent/secrets/\fR
The hub's secret and other secrets the configuration names.
.TP
\fI/etc/ess\-agent/adapters/\fR
The JSONata adapters routes name; examples are in \fI/usr/share/ess\-agent/examples/adapters/\fR.
.TP
\fI/var/lib/ess\-agent/journal.sqlite3\fR
The journal of received events and their delivery state.
.SH ENVIRONMENT
.TP
\fBESS_AGENT_CONFIG\fR
The configuration file, instead of \fI/etc/ess\-agent/ess\-agent.toml\fR.
.TP
\fBESS_AGENT_LOG\fR
The log filter, e.g. \fBinfo,ess_agent::access=debug\fR (adds a line per request).
.SH "SEE ALSO"
\fBsystemctl\fR(1), \fBjournalctl\fR(1); the operator's guide and the configuration reference
in \fI/usr/share/doc/ess\-agent/\fR.
"#;

#[test]
fn the_man_pages_match_the_command_line() {
    let dir = Path::new(ROOT).join("packaging/man");
    let pages = render_man_pages();
    if std::env::var_os("ESS_AGENT_WRITE_MAN_PAGES").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for (name, page) in &pages {
            std::fs::write(dir.join(name), page).unwrap();
        }
    }
    let mut committed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    committed.sort();
    let names: Vec<String> = pages.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        committed, names,
        "packaging/man is stale: regenerate it with \
         ESS_AGENT_WRITE_MAN_PAGES=1 cargo nextest run -E 'test(the_man_pages)'"
    );
    for (name, page) in &pages {
        assert!(
            std::fs::read(dir.join(name)).unwrap() == *page,
            "packaging/man/{name} is stale: regenerate it with \
             ESS_AGENT_WRITE_MAN_PAGES=1 cargo nextest run -E 'test(the_man_pages)'"
        );
    }
    assert!(names.contains(&"ess-agent.1".to_string()));
    assert!(names.contains(&"ess-agent-validate.1".to_string()));
}

/// cargo-deb takes the package version from Cargo.toml; the changelog it ships must agree.
#[test]
fn the_debian_changelog_names_this_version() {
    let changelog = read(Path::new(ROOT).join("packaging/debian/changelog"));
    let first = changelog.lines().next().unwrap_or_default();
    let expected = format!("ess-agent ({}-1) ", env!("CARGO_PKG_VERSION"));
    assert!(
        first.starts_with(&expected),
        "packaging/debian/changelog begins {first:?}: add an entry for this version"
    );
}

/// The package named by `var`; fails when the variable names no file.
fn package_named_by(var: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os(var)?);
    assert!(
        path.is_file(),
        "{var} names {}, which is not a file",
        path.display()
    );
    Some(path)
}

/// The .deb to inspect: the one `ESS_AGENT_DEB` names, else the one `scripts/package --profile
/// dev --deb-only --no-build` made of the binary under test (in the target directory's
/// `packages/dev`). Fails, saying what to run, when there is none or it is older than the binary.
fn deb_under_test() -> PathBuf {
    if let Some(deb) = package_named_by("ESS_AGENT_DEB") {
        return deb;
    }
    let build = "scripts/package --profile dev --deb-only --no-build";
    let binary = Path::new(support::binary());
    let dir = binary
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in the target directory")
        .join("packages/dev");
    let prefix = format!("ess-agent_{}-", env!("CARGO_PKG_VERSION"));
    let deb = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .unwrap_or_else(|| {
            panic!(
                "no .deb to inspect: run `{build}` (it prints the package's path), or set \
                 ESS_AGENT_DEB to a .deb built from this tree; scripts/test does both"
            )
        });
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    assert!(
        modified(&deb) >= modified(binary),
        "{} is older than the binary under test: run `{build}` again, or set ESS_AGENT_DEB to \
         a .deb built from this tree",
        deb.display()
    );
    deb
}

#[test]
fn the_deb_holds_the_binary_the_unit_the_conffile_and_the_maintainer_scripts() {
    let deb = deb_under_test();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let control = dir.path().join("control");
    for (what, target) in [("-x", &root), ("-e", &control)] {
        let out = run(Command::new("dpkg-deb").arg(what).arg(&deb).arg(target));
        assert!(
            out.status.success(),
            "dpkg-deb {what}: {}",
            text(&out.stderr)
        );
    }

    // Control: name, version, the user-creation tools it relies on.
    let fields = read(control.join("control"));
    assert!(
        fields.lines().any(|l| l == "Package: ess-agent"),
        "{fields}"
    );
    let version = format!("Version: {}-", env!("CARGO_PKG_VERSION"));
    assert!(fields.lines().any(|l| l.starts_with(&version)), "{fields}");
    let depends = fields
        .lines()
        .find(|l| l.starts_with("Depends:"))
        .unwrap_or_default();
    assert!(depends.contains("adduser"), "{depends}");
    assert!(depends.contains("libc6"), "{depends}");

    // The binary: runs, and is the agent of this version; no other binary is shipped.
    let binary = root.join("usr/bin/ess-agent");
    let out = run(Command::new(&binary).arg("--version"));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("ess-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let bins: Vec<_> = std::fs::read_dir(root.join("usr/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(bins, ["ess-agent"]);

    // The configuration: a conffile, the one in packaging/, and good once the secret is there.
    let conffiles = read(control.join("conffiles"));
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/ess-agent/ess-agent.toml"]
    );
    let config = read(root.join("etc/ess-agent/ess-agent.toml"));
    assert_eq!(
        config,
        read(Path::new(ROOT).join("packaging/ess-agent.toml"))
    );
    assert_packaged_config_validates(&binary, &config);

    // The unit: the one in packaging/, verified and rated with the packaged binary.
    let unit = read(root.join("usr/lib/systemd/system/ess-agent.service"));
    assert_eq!(
        unit,
        read(Path::new(ROOT).join("packaging/ess-agent.service"))
    );
    if systemd_analyze_available() {
        let path = unit_with_binary(dir.path(), &unit, &binary);
        assert_unit_verifies(&path);
        assert_unit_is_hardened(&path);
    }

    // Maintainer scripts: the user on configure, systemd's bookkeeping, the user gone on purge.
    let postinst = read(control.join("postinst"));
    assert!(
        postinst.contains("adduser --quiet --system --group"),
        "{postinst}"
    );
    assert!(postinst.contains("useradd --system"), "{postinst}");
    assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
    assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    let postrm = read(control.join("postrm"));
    assert!(
        postrm.contains("deluser --quiet --system ess-agent"),
        "{postrm}"
    );
    assert!(postrm.contains("deb-systemd-helper purge"), "{postrm}");
    let prerm = read(control.join("prerm"));
    assert!(prerm.contains("ess-agent.service"), "{prerm}");

    // Documentation, the man pages, the example adapters with their tests.
    for path in [
        "usr/share/doc/ess-agent/copyright",
        "usr/share/doc/ess-agent/README.md",
        "usr/share/doc/ess-agent/operations.md",
        "usr/share/doc/ess-agent/configuration.md",
        "usr/share/doc/ess-agent/adapters.md",
        "usr/share/doc/ess-agent/cookbook/pass-through.jsonata",
        "usr/share/man/man1/ess-agent.1.gz",
        "usr/share/man/man1/ess-agent-validate.1.gz",
        "usr/share/ess-agent/examples/adapters/README.md",
        "usr/share/ess-agent/examples/adapters/court-calendar.jsonata",
        "usr/share/ess-agent/examples/adapters/court-calendar.tests/deadline-moved-to-1600.json",
        "usr/share/ess-agent/examples/production.example.toml",
    ] {
        assert!(root.join(path).is_file(), "the package lacks /{path}");
    }
    let out = run(Command::new(&binary)
        .args(["adapter", "test", "--adapters-dir"])
        .arg(root.join("usr/share/ess-agent/examples/adapters")));
    assert!(
        out.status.success(),
        "the packaged example adapters fail their tests:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Not in CI (installing cargo-generate-rpm costs minutes); after `scripts/package`:
/// `ESS_AGENT_RPM=target/packages/release/ess-agent-*.rpm cargo nextest run --run-ignored only
/// -E 'test(the_rpm)'`.
#[test]
#[ignore = "needs ESS_AGENT_RPM, an .rpm built by scripts/package"]
fn the_rpm_holds_the_binary_the_unit_and_the_config() {
    let rpm = package_named_by("ESS_AGENT_RPM").expect("ESS_AGENT_RPM names the .rpm to inspect");
    assert!(
        available("rpm", "--version"),
        "ESS_AGENT_RPM is set but the rpm tool is not installed (apt-get install rpm)"
    );
    let query = |format: &str| {
        let out = run(Command::new("rpm")
            .args(["-qp", "--nosignature", "--queryformat", format])
            .arg(&rpm));
        assert!(out.status.success(), "rpm -qp: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(
        query("%{NAME} %{VERSION}"),
        format!("ess-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let files = query(
        "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]",
    );
    for line in [
        "-rwxr-xr-x root root  /usr/bin/ess-agent",
        "-rw-r--r-- root root  /usr/lib/systemd/system/ess-agent.service",
        "-rw-r----- root ess-agent cn /etc/ess-agent/ess-agent.toml",
        "-rw-r--r-- root root d /usr/share/man/man1/ess-agent.1",
        "-rw-r--r-- root root  /usr/share/ess-agent/examples/adapters/court-calendar.jsonata",
    ] {
        assert!(
            files.lines().any(|l| l == line),
            "the rpm lacks {line:?}:\n{files}"
        );
    }
    let scripts = query("%{PREIN}\n%{POSTIN}\n%{PREUN}\n%{POSTUN}");
    assert!(scripts.contains("useradd --system"), "{scripts}");
    assert!(
        scripts.contains("install -d -m 0750 -o root -g ess-agent"),
        "{scripts}"
    );
    assert!(
        scripts.contains("systemctl --no-reload preset"),
        "{scripts}"
    );
    assert!(scripts.contains("systemctl try-restart"), "{scripts}");
}

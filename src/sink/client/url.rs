//! A broker sink's `url`: a scheme of its two, a host and a port, nothing else.

/// How a sink's broker URL is written: `plain://host[:port]` or `tls://host[:port]` with the
/// sink's two schemes, nothing else.
pub struct UrlForm {
    /// The scheme without TLS, like `"mqtt"`.
    pub plain: &'static str,
    /// The scheme with TLS, like `"mqtts"`.
    pub tls: &'static str,
    /// The port when the URL names none: without TLS, then with it.
    pub ports: (u16, u16),
    /// How a valid URL looks, for every message (`write it like …`).
    pub example: &'static str,
    /// The settings that hold what a URL's credentials would, like `"username and password"`.
    pub credentials: &'static str,
    /// What to do instead of a path or query; `None` says the protocol has no use for one.
    pub path: Option<&'static str>,
    /// The protocol's name in messages, like `"MQTT"`.
    pub protocol: &'static str,
}

/// A broker's address, as `url` names it (an IPv6 host keeps its brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses a broker URL of `form`: one of its schemes, a host, an optional port, and no
/// credentials, path or query.
pub fn parse_url(url: &str, form: &UrlForm) -> Result<Address, String> {
    let example = form.example;
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL ({e}): {example}"))?;
    let tls = match uri.scheme_str() {
        Some(scheme) if scheme == form.plain => false,
        Some(scheme) if scheme == form.tls => true,
        _ => {
            return Err(format!(
                "{url:?} must start with {}:// or {}://: {example}",
                form.plain, form.tls
            ));
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(format!("{url:?} has no host: {example}"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "the URL carries credentials: remove them and set {} instead",
            form.credentials
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("{url:?} has no host: {example}"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(match form.path {
            Some(instead) => format!("{url:?} has a path or query: {instead}"),
            None => format!(
                "{url:?} has a path or query, which {} has no use for: {example}",
                form.protocol
            ),
        });
    }
    let (plain_port, tls_port) = form.ports;
    Ok(Address {
        host: authority.host().to_string(),
        port: authority
            .port_u16()
            .unwrap_or(if tls { tls_port } else { plain_port }),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: UrlForm = UrlForm {
        plain: "x",
        tls: "xs",
        ports: (1, 2),
        example: "write it like x://h",
        credentials: "user",
        path: None,
        protocol: "X",
    };

    #[test]
    fn a_url_of_the_form_gives_host_port_and_tls() {
        let a = parse_url("xs://[::1]", &FORM).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("[::1]", 2, true));
        assert_eq!(parse_url("x://h:9/", &FORM).unwrap().port, 9);
        assert_eq!(parse_url("x://h", &FORM).unwrap().port, 1);
        let e = parse_url("y://h", &FORM).unwrap_err();
        assert!(e.contains("must start with x:// or xs://"), "{e}");
        let e = parse_url("x://u:p@h", &FORM).unwrap_err();
        assert!(e.contains("remove them and set user instead"), "{e}");
        let e = parse_url("x://h/db", &FORM).unwrap_err();
        assert!(
            e.contains("which X has no use for: write it like x://h"),
            "{e}"
        );
        let path = UrlForm {
            path: Some("set the path elsewhere"),
            ..FORM
        };
        let e = parse_url("x://h/db", &path).unwrap_err();
        assert!(
            e.ends_with("has a path or query: set the path elsewhere"),
            "{e}"
        );
    }
}

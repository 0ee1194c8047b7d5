//! The one escaping function every page uses, and the page frame.
//!
//! Pages are written as Rust strings rather than with a template crate: a handful of pages does
//! not pay for a dependency, and every value from the journal goes through [`esc`] (text and
//! attribute values alike), so payload text is never markup.

/// `s` made safe as HTML text and as a double- or single-quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The navigation entries: path and label.
const NAV: &[(&str, &str)] = &[
    ("/console", "Overview"),
    ("/console/events", "Events"),
    ("/console/playground", "Playground"),
];

/// A whole page: `body` is already escaped markup; `refresh` reloads it every so many seconds.
pub fn page(title: &str, active: &str, body: &str, refresh: Option<u32>) -> String {
    let nav: String = NAV
        .iter()
        .map(|(path, label)| {
            let current = if *path == active {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<a href=\"{path}\"{current}>{label}</a>")
        })
        .collect();
    let refresh = refresh
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
         <title>{title} · ess-agent</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
         <script src=\"/console/assets/console.js\" defer></script></head>\
         <body><header><strong>ess-agent</strong><nav>{nav}</nav></header>\
         <main><h1>{title}</h1>{body}</main></body></html>\n",
        title = esc(title),
    )
}

/// A definition list of already-escaped values.
pub fn facts(rows: &[(&str, String)]) -> String {
    let mut out = String::from("<dl class=\"facts\">");
    for (name, value) in rows {
        out.push_str(&format!("<dt>{}</dt><dd>{value}</dd>", esc(name)));
    }
    out.push_str("</dl>");
    out
}

/// A hidden CSRF field for a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn markup_and_quotes_are_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
    }
}

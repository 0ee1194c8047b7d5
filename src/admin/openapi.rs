//! `GET /v1/openapi.json`: the OpenAPI 3.1 description of the admin API, kept in
//! `docs/openapi.json` and built into the binary.

use http::{HeaderValue, Response, StatusCode, header};

use crate::protocol::problem::Body;

/// The description, as committed.
pub const DESCRIPTION: &str = include_str!("../../docs/openapi.json");

/// The description as an answer.
pub fn response() -> Response<Body> {
    let mut response = Response::new(Body::from(DESCRIPTION));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::ENDPOINTS;
    use super::DESCRIPTION;

    /// Every endpoint served is described, and nothing else is.
    #[test]
    fn the_description_lists_exactly_the_endpoints_served() {
        let doc: Value = serde_json::from_str(DESCRIPTION).expect("docs/openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut described: Vec<String> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    described.push(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        described.sort();
        let mut served: Vec<String> = ENDPOINTS.iter().map(|e| e.to_string()).collect();
        served.sort();
        assert_eq!(described, served);
    }
}

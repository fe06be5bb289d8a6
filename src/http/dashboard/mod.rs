//! The live dashboard: one page, its script and its style sheet, embedded
//! in the binary (no CDN, no build step: it works on a VM with no
//! internet). The page reads the same `/stats/*` and `/admin/*` endpoints
//! as curl does, every 2 s, and computes no figure of its own.

use warp::filters::BoxedFilter;
use warp::http::HeaderValue;
use warp::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use warp::reply::Response;
use warp::{Filter, Reply};

/// The page.
const INDEX: &str = include_str!("index.html");
/// Its script: polling, charts, the DLQ buttons.
const SCRIPT: &str = include_str!("dashboard.js");
/// Its style sheet: light and dark, phone width.
const STYLE: &str = include_str!("dashboard.css");

/// The page may load only its own script and style and call only this
/// daemon: text from events (types, pages, errors) can never run as code.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// `GET /`, `GET /dashboard.js`, `GET /dashboard.css` (and `HEAD`, for
/// `curl -I`).
pub fn routes() -> BoxedFilter<(Response,)> {
    // The path is matched before the method: a request for another path
    // must be rejected as not found here, not as a method not allowed.
    let method = || warp::get().or(warp::head()).unify();
    let page = warp::path::end()
        .and(method())
        .map(|| asset(INDEX, "text/html; charset=utf-8"));
    let script = warp::path!("dashboard.js")
        .and(method())
        .map(|| asset(SCRIPT, "text/javascript; charset=utf-8"));
    let style = warp::path!("dashboard.css")
        .and(method())
        .map(|| asset(STYLE, "text/css; charset=utf-8"));
    page.or(script).unify().or(style).unify().boxed()
}

/// The total size of the page and what it loads.
pub fn weight() -> usize {
    INDEX.len() + SCRIPT.len() + STYLE.len()
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small enough to fetch again: a page from before an upgrade never
    // talks to the new daemon.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_weighs_under_150_kb_and_loads_only_its_own_parts() {
        assert!(weight() < 150 * 1024, "{} bytes", weight());
        for reference in ["src=\"/dashboard.js\"", "href=\"/dashboard.css\""] {
            assert!(INDEX.contains(reference), "{reference}");
        }
        // Nothing from another host: the page must work offline.
        for text in [INDEX, SCRIPT, STYLE] {
            let namespace = text.matches("http://www.w3.org/2000/svg").count();
            assert_eq!(text.matches("http://").count(), namespace);
            assert!(!text.contains("https://"));
        }
    }

    #[tokio::test]
    async fn each_part_is_served_with_its_type_and_policy() {
        for (path, kind) in [
            ("/", "text/html"),
            ("/dashboard.js", "text/javascript"),
            ("/dashboard.css", "text/css"),
        ] {
            let response = warp::test::request().path(path).reply(&routes()).await;
            assert_eq!(response.status(), 200, "{path}");
            let headers = response.headers();
            assert!(
                headers[CONTENT_TYPE].to_str().unwrap().starts_with(kind),
                "{path}"
            );
            assert!(headers.contains_key(CONTENT_SECURITY_POLICY), "{path}");
        }
        let post = warp::test::request()
            .method("POST")
            .path("/")
            .reply(&routes())
            .await;
        assert_eq!(post.status(), 405);
    }
}

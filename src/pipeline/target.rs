//! The request target, made canonical once: the path the route is chosen
//! by, the policy judges and the upstream receives are one and the same.
//!
//! Upstreams resolve dot segments (RFC 3986 §5.2.4) and many decode `%2e`
//! as `.` first, so `/public/../admin` judged as `/public/…` would reach
//! `/admin`. The canonical form resolves dot segments (percent-encoded
//! dots included) and merges empty segments, and refuses what has no
//! single meaning: an encoded `/` or `\`, a raw `\`, NUL, a dot segment
//! carrying `;` parameters (Tomcat reads `..;` as `..`). Everything else
//! (`%25`, `%20`, …) is left as the client sent it.

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::Uri;

/// Why a path has no single meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    #[error("the path holds an encoded `/` or `\\`")]
    EncodedSeparator,
    #[error("the path holds a backslash")]
    Backslash,
    #[error("the path holds a NUL byte")]
    Nul,
    #[error("the path holds a dot segment with `;` parameters")]
    DotSegmentParameters,
}

/// The canonical form of `path` (a request target's path, without its
/// query), borrowed when it already is canonical.
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, Refused> {
    if !path.starts_with('/') {
        return Err(Refused::NotAbsolute);
    }
    check_bytes(path)?;
    if !needs_rewrite(path) {
        return Ok(Cow::Borrowed(path));
    }
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    // A path that ends in `/`, `/.` or `/..` names a directory: it keeps
    // its trailing slash (RFC 3986 §5.2.4 keeps it too).
    let mut trailing_slash = false;
    for (index, segment) in segments.iter().enumerate() {
        let last = index + 1 == segments.len();
        match dot_segment(segment)? {
            Some(Dot::Current) => trailing_slash = last,
            Some(Dot::Parent) => {
                kept.pop();
                trailing_slash = last;
            }
            None if segment.is_empty() => trailing_slash = last,
            None => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut canonical = String::with_capacity(path.len());
    for segment in &kept {
        canonical.push('/');
        canonical.push_str(segment);
    }
    if canonical.is_empty() || trailing_slash {
        canonical.push('/');
    }
    if canonical == path {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(canonical))
}

/// Makes `uri`'s path canonical in place; its query, and the scheme and
/// authority of an absolute-form target, are kept as sent.
pub fn canonicalize(uri: &mut Uri) -> Result<(), Refused> {
    let path = match canonical_path(uri.path())? {
        Cow::Borrowed(_) => return Ok(()),
        Cow::Owned(path) => path,
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    // Rebuilt from a path made of the original's own bytes: it parses.
    parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
    *uri = Uri::from_parts(parts).map_err(|_| Refused::NotAbsolute)?;
    Ok(())
}

enum Dot {
    Current,
    Parent,
}

/// Whether `segment` is `.` or `..`, its dots possibly percent-encoded.
fn dot_segment(segment: &str) -> Result<Option<Dot>, Refused> {
    let (name, parameters) = match segment.split_once(';') {
        Some((name, _)) => (name, true),
        None => (segment, false),
    };
    let dot = match decoded_dots(name) {
        Some(1) => Some(Dot::Current),
        Some(2) => Some(Dot::Parent),
        _ => None,
    };
    match dot {
        Some(_) if parameters => Err(Refused::DotSegmentParameters),
        dot => Ok(dot),
    }
}

/// How many dots `name` is, when it is made of nothing else (`.`, `%2e`,
/// `%2E` each count one); `None` otherwise.
fn decoded_dots(name: &str) -> Option<usize> {
    let bytes = name.as_bytes();
    let (mut at, mut dots) = (0, 0);
    while at < bytes.len() && dots < 3 {
        if bytes[at] == b'.' {
            at += 1;
        } else if bytes[at..].len() >= 3
            && bytes[at] == b'%'
            && bytes[at + 1] == b'2'
            && bytes[at + 2].eq_ignore_ascii_case(&b'e')
        {
            at += 3;
        } else {
            return None;
        }
        dots += 1;
    }
    (at == bytes.len() && dots > 0).then_some(dots)
}

fn check_bytes(path: &str) -> Result<(), Refused> {
    let bytes = path.as_bytes();
    for (at, &byte) in bytes.iter().enumerate() {
        match byte {
            b'\\' => return Err(Refused::Backslash),
            0 => return Err(Refused::Nul),
            b'%' => match hex_byte(&bytes[at + 1..]) {
                Some(b'/' | b'\\') => return Err(Refused::EncodedSeparator),
                Some(0) => return Err(Refused::Nul),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(())
}

fn hex_byte(bytes: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    match bytes {
        [high, low, ..] => Some((digit(*high)? * 16 + digit(*low)?) as u8),
        _ => None,
    }
}

/// Whether the path may hold an empty or dot segment: most paths hold
/// neither, and are passed on without a copy.
fn needs_rewrite(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes
        .windows(2)
        .any(|pair| matches!(pair, [b'/', b'/' | b'.' | b'%']))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(path: &str) -> String {
        canonical_path(path).unwrap().into_owned()
    }

    #[test]
    fn dot_and_empty_segments_resolve() {
        for (input, expected) in [
            ("/", "/"),
            ("/api/login-options", "/api/login-options"),
            ("/api/login-options/../../admin/secret", "/admin/secret"),
            ("/api/login-options/%2e%2e/%2E%2E/admin", "/admin"),
            ("/api/login-options/.%2e/admin", "/api/admin"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/static/", "/static/"),
            ("/a/...", "/a/..."),
            ("/a/.hidden/%2e%2e%2e", "/a/.hidden/%2e%2e%2e"),
            ("/a%2eb/c", "/a%2eb/c"),
            ("/files/%25/%20x", "/files/%25/%20x"),
            ("/a;v=1/b", "/a;v=1/b"),
            ("/a/%2e", "/a/"),
        ] {
            assert_eq!(ok(input), expected, "{input}");
        }
    }

    #[test]
    fn paths_without_a_single_meaning_are_refused() {
        for (input, why) in [
            ("/api/login-options/..%2fadmin", Refused::EncodedSeparator),
            ("/api/%2F/admin", Refused::EncodedSeparator),
            ("/api/%5c../admin", Refused::EncodedSeparator),
            ("/api/..\\admin", Refused::Backslash),
            (
                "/api/login-options/..;/admin",
                Refused::DotSegmentParameters,
            ),
            ("/api/.;x=1/admin", Refused::DotSegmentParameters),
            ("/api/%2e%2e;/admin", Refused::DotSegmentParameters),
            ("/a%00b", Refused::Nul),
            ("*", Refused::NotAbsolute),
            ("", Refused::NotAbsolute),
        ] {
            assert_eq!(canonical_path(input), Err(why), "{input}");
        }
    }

    #[test]
    fn canonical_paths_are_not_copied() {
        assert!(matches!(
            canonical_path("/console/devices/abc"),
            Ok(Cow::Borrowed(_))
        ));
    }

    /// What an upstream that decodes `%2e` and resolves dot segments
    /// makes of a path (nginx, Apache, most frameworks). A canonical path
    /// has nothing left for it to resolve: it only decodes.
    fn as_upstream_reads(path: &str) -> String {
        let decoded = path.replace("%2e", ".").replace("%2E", ".");
        let directory =
            decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
        let mut out: Vec<&str> = Vec::new();
        for segment in decoded.split('/').skip(1) {
            match segment {
                "." | "" => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        let read = format!("/{}", out.join("/"));
        if directory && read != "/" {
            read + "/"
        } else {
            read
        }
    }

    fn hostile_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2f".to_owned()),
            Just("%5C".to_owned()),
            Just("%25".to_owned()),
            Just(";".to_owned()),
            Just("\\".to_owned()),
            "[a-z]{1,3}",
            "[ -~]",
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|p| format!("/{}", p.concat()))
    }

    proptest! {
        #[test]
        fn never_panics(path in "\\PC*") {
            let _ = canonical_path(&path);
        }

        #[test]
        fn is_idempotent(path in hostile_path()) {
            if let Ok(once) = canonical_path(&path) {
                let twice = canonical_path(&once).expect("a canonical path is accepted");
                prop_assert_eq!(twice.as_ref(), once.as_ref());
            }
        }

        /// The path judged is the path the upstream serves: once canonical,
        /// an upstream's own resolution changes nothing but a trailing slash.
        #[test]
        fn upstream_reads_what_was_judged(path in hostile_path()) {
            if let Ok(canonical) = canonical_path(&path) {
                let canonical = canonical.as_ref();
                prop_assert!(!canonical.contains("//"));
                let read = as_upstream_reads(canonical);
                let decoded = canonical.replace("%2e", ".").replace("%2E", ".");
                prop_assert_eq!(read, decoded);
            }
        }

        /// The route chosen is the route of the path the upstream serves.
        #[test]
        fn the_route_decision_is_the_upstreams(path in hostile_path()) {
            let routes = crate::forward::routes::table_of(&["/", "/api/public", "/admin", "/static/"]);
            if let Ok(canonical) = canonical_path(&path) {
                let read = as_upstream_reads(&canonical);
                prop_assert_eq!(&routes.find(&canonical).prefix, &routes.find(&read).prefix);
            }
        }
    }
}

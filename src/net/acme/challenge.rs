//! The answers to the CA's challenges while an order is open: a
//! certificate for TLS-ALPN-01 (RFC 8737), handed out by the TLS
//! listener's resolver, and a key authorization for HTTP-01 (RFC 8555
//! §8.3), answered by the port-80 listener.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use http::{Response, StatusCode};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::net::tls::{self, ReloadableCert, TlsError, ACME_TLS_ALPN};

/// Where HTTP-01 validation asks (RFC 8555 §8.3).
const HTTP_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// A TLS-ALPN-01 answer: the key authorization's digest, and the
/// certificate made of it.
type AlpnAnswer = (Vec<u8>, Arc<CertifiedKey>);

#[derive(Debug, Default)]
pub struct Challenges {
    /// By lower-case host name.
    tls_alpn: RwLock<HashMap<String, AlpnAnswer>>,
    /// Key authorizations by token.
    http: RwLock<HashMap<String, String>>,
}

/// The published answers, as replicas share them: every replica must
/// answer, since the CA validates through whichever it reaches.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Answers {
    /// Host name → the key authorization's SHA-256.
    tls_alpn: BTreeMap<String, Vec<u8>>,
    /// Token → key authorization.
    http: BTreeMap<String, String>,
}

impl Challenges {
    /// Publishes the TLS-ALPN-01 answer for `name`: a self-signed
    /// certificate for it carrying `digest` (the key authorization's
    /// SHA-256) in the critical acmeIdentifier extension (RFC 8737 §3).
    pub(super) fn publish_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<(), TlsError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let certified = tls::certified(&params.self_signed(&key)?, &key)?;
        write(&self.tls_alpn).insert(
            name.to_ascii_lowercase(),
            (digest.to_vec(), Arc::new(certified)),
        );
        Ok(())
    }

    /// What is published now.
    pub(super) fn answers(&self) -> Answers {
        Answers {
            tls_alpn: read(&self.tls_alpn)
                .iter()
                .map(|(name, (digest, _))| (name.clone(), digest.clone()))
                .collect(),
            http: read(&self.http)
                .iter()
                .map(|(token, authorization)| (token.clone(), authorization.clone()))
                .collect(),
        }
    }

    /// Publishes what another replica published, and only that; a
    /// certificate already made for the same digest is kept.
    pub(super) fn mirror(&self, answers: Answers) -> Result<(), TlsError> {
        let unchanged = |name: &String, digest: &Vec<u8>| {
            read(&self.tls_alpn)
                .get(name)
                .is_some_and(|(kept, _)| kept == digest)
        };
        for (name, digest) in &answers.tls_alpn {
            if !unchanged(name, digest) {
                self.publish_tls_alpn(name, digest)?;
            }
        }
        write(&self.tls_alpn).retain(|name, _| answers.tls_alpn.contains_key(name));
        *write(&self.http) = answers.http.into_iter().collect();
        Ok(())
    }

    pub(super) fn publish_http(&self, token: &str, key_authorization: &str) {
        write(&self.http).insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Takes every answer down: called when an order ends, whatever its
    /// outcome (one order runs at a time).
    pub(super) fn withdraw(&self) {
        write(&self.tls_alpn).clear();
        write(&self.http).clear();
    }

    /// The port-80 listener's answer under `/.well-known/acme-challenge/`:
    /// the key authorization of a published token, 404 for any other;
    /// `None` for other paths (they are redirected to https).
    pub fn http_answer(&self, path: &str) -> Option<Response<crate::Body>> {
        let token = path.strip_prefix(HTTP_CHALLENGE_PATH)?;
        let answer = read(&self.http).get(token).cloned();
        let (status, body) = match answer {
            Some(authorization) => (StatusCode::OK, authorization),
            None => (StatusCode::NOT_FOUND, "no such ACME challenge\n".to_owned()),
        };
        Some(
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(crate::pages::full(body))
                .expect("a valid response"),
        )
    }

    fn tls_alpn(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        read(&self.tls_alpn)
            .get(&name.to_ascii_lowercase())
            .map(|(_, certified)| certified.clone())
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The HTTPS listener's certificates with ACME: the challenge certificate
/// to a validation handshake (ALPN `acme-tls/1` only, RFC 8737 §3),
/// the served certificate to everyone else.
#[derive(Debug)]
pub struct Resolver {
    pub cert: Arc<ReloadableCert>,
    pub challenges: Arc<Challenges>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // The CA offers acme-tls/1 alone; a client offering more is a
        // client, and gets the served certificate.
        let validating = hello.alpn().is_some_and(|mut offered| {
            offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
        });
        if validating {
            // No answer published for the name: the handshake fails, as
            // the RFC wants for a name not being validated.
            return hello
                .server_name()
                .and_then(|name| self.challenges.tls_alpn(name));
        }
        self.cert.resolve(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const AUTHORIZATION: &str = "tok_en-1.thumbprint";

    #[tokio::test]
    async fn http_answers_only_published_tokens_and_only_under_its_path() {
        let challenges = Challenges::default();
        let status = |path| challenges.http_answer(path).map(|r| r.status());
        let token_path = "/.well-known/acme-challenge/tok_en-1";
        assert_eq!(status(token_path), Some(StatusCode::NOT_FOUND));
        challenges.publish_http("tok_en-1", AUTHORIZATION);
        let answer = challenges.http_answer(token_path).unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, AUTHORIZATION.as_bytes());
        for other in [
            "/.well-known/acme-challenge/tok_en-",
            "/.well-known/acme-challenge/tok_en-1/",
            "/.well-known/acme-challenge/",
        ] {
            assert_eq!(status(other), Some(StatusCode::NOT_FOUND), "{other}");
        }
        assert_eq!(status("/tok_en-1"), None);
        assert_eq!(status("/"), None);
        challenges.withdraw();
        assert_eq!(status(token_path), Some(StatusCode::NOT_FOUND));
    }

    #[test]
    fn a_replica_mirrors_exactly_what_another_published() {
        let orderer = Challenges::default();
        orderer
            .publish_tls_alpn("console.example.com", &[1; 32])
            .unwrap();
        orderer.publish_http("tok_en-1", AUTHORIZATION);
        let answers = orderer.answers();
        let shared: Answers =
            serde_json::from_str(&serde_json::to_string(&answers).unwrap()).unwrap();
        assert_eq!(shared, answers);

        let follower = Challenges::default();
        follower.publish_http("stale", "stale.thumbprint");
        follower.mirror(shared).unwrap();
        assert_eq!(follower.answers(), orderer.answers());
        let made = follower.tls_alpn("console.example.com").unwrap();
        // The same digest again keeps the certificate made for it.
        follower.mirror(orderer.answers()).unwrap();
        assert!(Arc::ptr_eq(
            &made,
            &follower.tls_alpn("console.example.com").unwrap()
        ));
        follower.mirror(Answers::default()).unwrap();
        assert!(follower.tls_alpn("console.example.com").is_none());
        assert_eq!(follower.answers(), Answers::default());
    }

    #[test]
    fn the_tls_alpn_certificate_carries_the_digest_for_its_name_only() {
        let challenges = Challenges::default();
        let digest = [7u8; 32];
        challenges
            .publish_tls_alpn("Console.Example.com", &digest)
            .unwrap();
        assert!(challenges.tls_alpn("other.example.com").is_none());
        let cert = challenges.tls_alpn("console.example.COM").unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).unwrap();
        // id-pe-acmeIdentifier, RFC 8737 §6.1: critical, an OCTET STRING
        // of the SHA-256 digest.
        let extension = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(extension.critical);
        assert_eq!(&extension.value[2..], &digest);
        let names = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(names.value.general_names.len(), 1);
        challenges.withdraw();
        assert!(challenges.tls_alpn("console.example.com").is_none());
    }
}

//! Compatibility with Azure App Service's built-in authentication ("Easy
//! Auth", `headers.easy_auth`): the headers App Service gives an app about
//! its signed-in user, and the claims its `/.auth/me` lists, so that an
//! app written for App Service runs unchanged behind the gateway. The
//! formats are App Service's:
//! <https://learn.microsoft.com/azure/app-service/configure-authentication-user-identities>
//! and <https://learn.microsoft.com/azure/app-service/configure-authentication-oauth-tokens>.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http::header::{HeaderName, HeaderValue};
use serde::Serialize;

use super::identity::Identity;

/// App Service's name for Entra ID, in `X-MS-CLIENT-PRINCIPAL-IDP`,
/// `auth_typ`, `provider_name` and `/.auth/login/aad`.
pub const PROVIDER: &str = "aad";

/// .NET's claim types for a principal's name and roles (`ClaimTypes.Name`,
/// `ClaimTypes.Role`), which App Service names in `name_typ`/`role_typ`.
const NAME_TYPE: &str = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name";
const ROLE_TYPE: &str = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role";

const PRINCIPAL: HeaderName = HeaderName::from_static("x-ms-client-principal");
const PRINCIPAL_NAME: HeaderName = HeaderName::from_static("x-ms-client-principal-name");
const PRINCIPAL_ID: HeaderName = HeaderName::from_static("x-ms-client-principal-id");
const PRINCIPAL_IDP: HeaderName = HeaderName::from_static("x-ms-client-principal-idp");
const ID_TOKEN: HeaderName = HeaderName::from_static("x-ms-token-aad-id-token");
const ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-ms-token-aad-access-token");

/// The tokens behind a signed-in request: `claims_of` is the verified JWT
/// whose claims the principal lists (a session's ID token, a bearer
/// request's access token).
#[derive(Debug, Clone, Copy)]
pub struct Tokens<'a> {
    pub claims_of: &'a str,
    pub id_token: Option<&'a str>,
    pub access_token: Option<&'a str>,
}

/// One claim as App Service lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub typ: String,
    pub val: String,
}

#[derive(Serialize)]
struct Principal<'a> {
    auth_typ: &'a str,
    claims: &'a [Claim],
    name_typ: &'a str,
    role_typ: &'a str,
}

/// What `headers.easy_auth` adds to signed-in requests.
#[derive(Debug, Clone, Copy)]
pub struct EasyAuth {
    /// `headers.easy_auth_tokens`: the provider's tokens too.
    pub tokens: bool,
}

impl EasyAuth {
    /// Every header it may set: a forward-auth answer names each.
    pub fn names(self) -> impl Iterator<Item = &'static HeaderName> {
        static NAMES: [HeaderName; 6] = [
            PRINCIPAL,
            PRINCIPAL_NAME,
            PRINCIPAL_ID,
            PRINCIPAL_IDP,
            ID_TOKEN,
            ACCESS_TOKEN,
        ];
        NAMES.iter().take(if self.tokens { 6 } else { 4 })
    }

    /// The headers for `identity`, proved by `tokens`. A value that cannot
    /// be a header is left out, as the other identity headers are.
    pub fn headers(
        &self,
        identity: &Identity,
        tokens: &Tokens<'_>,
        out: &mut Vec<(HeaderName, HeaderValue)>,
    ) {
        let mut set = |name: HeaderName, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                out.push((name, value));
            }
        };
        set(
            PRINCIPAL,
            &principal(&claims(tokens.claims_of, &identity.username)),
        );
        set(PRINCIPAL_NAME, &identity.username);
        set(PRINCIPAL_ID, &identity.user_id);
        set(PRINCIPAL_IDP, PROVIDER);
        if self.tokens {
            if let Some(id_token) = tokens.id_token {
                set(ID_TOKEN, id_token);
            }
            if let Some(access_token) = tokens.access_token {
                set(ACCESS_TOKEN, access_token);
            }
        }
    }
}

/// `X-MS-CLIENT-PRINCIPAL`: the claims as base64 JSON.
pub fn principal(claims: &[Claim]) -> String {
    let principal = Principal {
        auth_typ: PROVIDER,
        claims,
        name_typ: NAME_TYPE,
        role_typ: ROLE_TYPE,
    };
    STANDARD.encode(serde_json::to_vec(&principal).expect("claims serialize"))
}

/// The claims of `jwt` (verified when it was accepted) as App Service
/// lists them: types mapped as .NET's JWT handler maps them (App Service
/// is built on it, and apps look for those names), one claim per element
/// of an array, numbers and booleans as text. A token without
/// `unique_name` (every v2 token) gets a name claim holding `username`,
/// the value of `X-MS-CLIENT-PRINCIPAL-NAME`, so that the principal's
/// name (`name_typ`) is that user in .NET and elsewhere.
pub fn claims(jwt: &str, username: &str) -> Vec<Claim> {
    let payload = jwt
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|p| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&p).ok())
        .unwrap_or_default();
    let mut claims = Vec::with_capacity(payload.len() + 1);
    for (name, value) in &payload {
        let typ = claim_type(name);
        let values = match value {
            serde_json::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for value in values {
            let val = match value {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            claims.push(Claim {
                typ: typ.to_owned(),
                val,
            });
        }
    }
    if !payload.contains_key("unique_name") {
        claims.push(Claim {
            typ: NAME_TYPE.to_owned(),
            val: username.to_owned(),
        });
    }
    claims
}

/// The long type .NET's `JwtSecurityTokenHandler` gives a JWT claim (its
/// `ClaimTypeMapping.InboundClaimTypeMap`, the entries Entra's tokens
/// use); other claims keep their JWT names.
fn claim_type(name: &str) -> &str {
    match name {
        "sub" | "nameid" => "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier",
        "unique_name" => NAME_TYPE,
        "email" => "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
        "given_name" => "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/givenname",
        "family_name" => "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/surname",
        "upn" => "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn",
        "role" | "roles" => ROLE_TYPE,
        "oid" => "http://schemas.microsoft.com/identity/claims/objectidentifier",
        "tid" => "http://schemas.microsoft.com/identity/claims/tenantid",
        "scp" => "http://schemas.microsoft.com/identity/claims/scope",
        "idp" => "http://schemas.microsoft.com/identity/claims/identityprovider",
        "acr" => "http://schemas.microsoft.com/claims/authnclassreference",
        "amr" => "http://schemas.microsoft.com/claims/authnmethodsreferences",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> String {
        format!(
            "e30.{}.c2ln",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap())
        )
    }

    fn decoded(principal: &str) -> serde_json::Value {
        serde_json::from_slice(&STANDARD.decode(principal).unwrap()).unwrap()
    }

    #[test]
    fn claims_are_listed_as_app_service_lists_them() {
        let token = jwt(serde_json::json!({
            "sub": "sub-1", "oid": "oid-1", "tid": "tid-1",
            "preferred_username": "alice@contoso.example",
            "email": "alice@contoso.example", "name": "Alice",
            "groups": ["g1", "g2"], "roles": ["Console.Admin"],
            "exp": 1700000000, "email_verified": true,
        }));
        let claims = claims(&token, "alice@contoso.example");
        let has = |typ: &str, val: &str| {
            assert!(
                claims.contains(&Claim {
                    typ: typ.into(),
                    val: val.into()
                }),
                "{typ}={val} in {claims:?}"
            );
        };
        has(
            "http://schemas.microsoft.com/identity/claims/objectidentifier",
            "oid-1",
        );
        has(
            "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier",
            "sub-1",
        );
        has(
            "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
            "alice@contoso.example",
        );
        has("preferred_username", "alice@contoso.example");
        has("name", "Alice");
        has("groups", "g1");
        has("groups", "g2");
        has(ROLE_TYPE, "Console.Admin");
        has("exp", "1700000000");
        has("email_verified", "true");
        has(NAME_TYPE, "alice@contoso.example");

        let principal = decoded(&principal(&claims));
        assert_eq!(principal["auth_typ"], "aad");
        assert_eq!(principal["name_typ"], NAME_TYPE);
        assert_eq!(principal["role_typ"], ROLE_TYPE);
        assert_eq!(principal["claims"].as_array().unwrap().len(), claims.len());
    }

    #[test]
    fn a_v1_name_is_not_doubled_and_a_broken_token_lists_only_the_name() {
        let token = jwt(serde_json::json!({ "unique_name": "alice@contoso.example" }));
        assert_eq!(
            claims(&token, "alice@contoso.example"),
            vec![Claim {
                typ: NAME_TYPE.into(),
                val: "alice@contoso.example".into()
            }]
        );
        assert_eq!(claims("not a token", "bob").len(), 1);
    }
}

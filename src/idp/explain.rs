//! Sign-in failures explained for the people who meet them: what went
//! wrong and what the admin should check. RustDesk's Azure guide has an
//! empty troubleshooting section; this is where that knowledge lives.
//!
//! Codes and meanings: Microsoft's "Microsoft Entra authentication and
//! authorization error codes" (learn.microsoft.com/entra/identity-platform/
//! reference-error-codes); every code can be looked up at
//! `https://<the cloud's login host>/error?code=<number>`.

use http::StatusCode;

use crate::idp::cloud::Cloud;

use crate::idp::provider::SignInError;
use crate::pages::Page;

/// (code, what it means, what to check)
const AADSTS: &[(&str, &str, &str)] = &[
    ("50011", "The redirect URI sent does not match any registered for the app.",
     "In Azure portal → App registrations → your app → Authentication, add a Web redirect URI exactly equal to {redirect_uri} (scheme, host, port and path must match)."),
    ("700016", "The application (client) ID is not known in this tenant.",
     "Check oidc.client_id against the app's Application (client) ID, and that oidc.issuer names the tenant where the app is registered."),
    ("90002", "The tenant in the issuer URL does not exist.",
     "Check the Directory (tenant) ID in oidc.issuer: https://login.microsoftonline.com/<tenant id>/v2.0."),
    ("7000215", "The client secret is wrong.",
     "Use the secret's Value (shown once when created), not its Secret ID, in oidc.client_secret."),
    ("7000222", "The client secret has expired.",
     "Create a new client secret under Certificates & secrets and put its Value in oidc.client_secret."),
    ("50105", "The signed-in user is not assigned to this application.",
     "Assign the user or their group in Enterprise applications → your app → Users and groups, or set \"Assignment required\" to No."),
    ("65001", "Consent for the app's permissions has not been granted.",
     "Grant admin consent under App registrations → your app → API permissions."),
    ("65004", "The user declined to consent to the app.",
     "Ask an admin to grant consent for the organisation, or sign in again and accept."),
    ("700054", "The app registration does not allow the requested response type.",
     "Under Authentication, enable \"ID tokens (used for implicit and hybrid flows)\", as RustDesk's Azure guide says."),
    ("50020", "The user's account is not in this tenant.",
     "Invite the user as a guest, or sign in with an account of the tenant named in oidc.issuer."),
    ("53003", "Conditional Access blocked the sign-in.",
     "Check the Conditional Access policies that apply to this user and app in the Entra admin center."),
    ("50076", "Multi-factor authentication is required.",
     "Sign in again and complete the MFA prompt."),
    ("54005", "The authorization code was already used.",
     "Start the sign-in again; do not reload the callback page."),
    ("70008", "The authorization code or refresh token has expired.",
     "Start the sign-in again."),
    ("501481", "The PKCE code verifier did not match.",
     "Start the sign-in again; if it persists, check that nothing between browser and gateway rewrites the callback."),
];

/// The explanation of an `error`/`error_description` the provider sent,
/// either to the callback or from the token endpoint.
pub fn provider_error(
    error: &str,
    description: Option<&str>,
    redirect_uri: &str,
    cloud: &Cloud,
) -> Page {
    let description = description.unwrap_or("").trim();
    let code = aadsts_code(description);
    let known = code.and_then(|c| AADSTS.iter().find(|(k, _, _)| *k == c));
    let title = match error {
        "access_denied" => "Sign-in was cancelled or denied",
        "consent_required" | "interaction_required" | "login_required" => {
            "The sign-in needs your action"
        }
        _ => "Sign-in failed at Microsoft Entra ID",
    };
    let mut page = Page::new(
        StatusCode::UNAUTHORIZED,
        code.map(|c| format!("AADSTS{c}"))
            .unwrap_or_else(|| error.to_owned()),
        title,
        match known {
            Some((_, meaning, _)) => meaning.to_string(),
            None if description.is_empty() => format!("The provider answered `{error}`."),
            None => first_line(description).to_owned(),
        },
    );
    if let Some((_, _, fix)) = known {
        page.advice
            .push(fix.replace("{redirect_uri}", redirect_uri));
    } else if error == "invalid_client" || description.contains("client_assertion") {
        page.advice.push(
            "The provider did not accept the app's credential: check oidc.client_secret (the secret's \
             Value, not its ID, and not expired), or the certificate or federated credential set up \
             for the app registration."
                .into(),
        );
    }
    if let Some(code) = code {
        page.advice.push(format!(
            "Microsoft's description of this code: https://{}/error?code={code}",
            cloud.login_host()
        ));
    }
    if !description.is_empty() {
        page.advice
            .push(format!("The provider said: {}", first_line(description)));
    }
    page.link = Some(("/".into(), "Try signing in again"));
    page
}

/// What the gateway says when finishing a sign-in failed.
pub fn sign_in_error(error: &SignInError, redirect_uri: &str, cloud: &Cloud) -> Page {
    match error {
        SignInError::Refused { error, description } => {
            provider_error(error, description.as_deref(), redirect_uri, cloud)
        }
        SignInError::NotReady | SignInError::Unreachable | SignInError::Exchange(_) => {
            let mut page = Page::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_unreachable",
                "The sign-in provider cannot be reached",
                "The gateway could not talk to Microsoft Entra ID to complete the sign-in. \
                 Pages you are already signed in to keep working.",
            );
            page.advice.push("Try again in a minute.".into());
            page.advice.push(format!(
                "If it persists, an admin should check that this host can reach {} \
                 (DNS, firewall, proxy) and run `authgate check`.",
                cloud.login_host()
            ));
            page.link = Some(("/".into(), "Try again"));
            page
        }
        SignInError::Credential(_) => {
            let mut page = Page::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "credential_unusable",
                "The gateway cannot prove itself to the sign-in provider",
                format!("The sign-in could not be completed: {error}."),
            );
            page.advice.push(
                "An admin should check oidc.client_certificate and oidc.client_key (private_key_jwt) \
                 or the federated token file (federated), then run `authgate check`."
                    .into(),
            );
            page.link = Some(("/".into(), "Try again"));
            page
        }
        SignInError::NoIdToken | SignInError::Token(_) => {
            let mut page = Page::new(
                StatusCode::UNAUTHORIZED,
                "id_token_rejected",
                "The sign-in could not be verified",
                format!("Microsoft Entra ID answered, but {error}."),
            );
            page.advice.push(
                "Check that the server's clock is correct, and that oidc.issuer and oidc.client_id match the app registration."
                    .into(),
            );
            page.link = Some(("/".into(), "Try signing in again"));
            page
        }
    }
}

/// `AADSTS50011: The redirect URI…` → `50011`.
fn aadsts_code(description: &str) -> Option<&str> {
    let rest = &description[description.find("AADSTS")? + "AADSTS".len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// Entra appends "Trace ID: … Correlation ID: … Timestamp: …" lines.
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_get_a_meaning_and_a_fix() {
        let page = provider_error(
            "invalid_request",
            Some("AADSTS50011: The redirect URI 'https://x/api/oidc/callback' specified in the request does not match.\r\nTrace ID: 1"),
            "https://console.example.com/api/oidc/callback",
            &Cloud::Global,
        );
        assert_eq!(page.code, "AADSTS50011");
        assert!(page.detail.contains("redirect URI"));
        assert!(page.advice[0].contains("https://console.example.com/api/oidc/callback"));
        assert!(page.advice.iter().any(|a| a.contains("error?code=50011")));
        assert!(!page.advice.iter().any(|a| a.contains("Trace ID")));
    }

    #[test]
    fn error_codes_are_explained_at_the_users_own_cloud() {
        let issuer = "https://login.microsoftonline.us/7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b/v2.0";
        let page = provider_error(
            "invalid_client",
            Some("AADSTS7000215: Invalid client secret provided."),
            "https://console.example.gov/api/oidc/callback",
            &Cloud::of_issuer(issuer),
        );
        assert!(page
            .advice
            .iter()
            .any(|a| a.contains("https://login.microsoftonline.us/error?code=7000215")));
    }

    #[test]
    fn unknown_errors_still_say_what_came_back() {
        let page = provider_error("access_denied", None, "https://h/cb", &Cloud::Global);
        assert_eq!(page.code, "access_denied");
        assert!(page.detail.contains("access_denied"));
        assert!(page.title.contains("cancelled"));
    }
}

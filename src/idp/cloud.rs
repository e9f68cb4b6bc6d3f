//! Which Microsoft Entra cloud an issuer belongs to, read from its host:
//! each cloud signs users in at a login host of its own
//! (learn.microsoft.com/entra/identity-platform/authentication-national-cloud),
//! and Entra External ID tenants at `<tenant>.ciamlogin.com`.

use http::Uri;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cloud {
    /// `login.microsoftonline.com`.
    Global,
    /// `login.microsoftonline.us`.
    UsGovernment,
    /// `login.partner.microsoftonline.cn` (and the older
    /// `login.chinacloudapi.cn`).
    China,
    /// `<tenant>.ciamlogin.com`: the login host is the tenant's own.
    ExternalId(String),
    /// Not Microsoft Entra ID: a generic OpenID provider.
    Other,
}

impl Cloud {
    pub fn of_issuer(issuer: &str) -> Cloud {
        let host = issuer
            .parse::<Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        match host.as_str() {
            "login.microsoftonline.com" => Cloud::Global,
            "login.microsoftonline.us" => Cloud::UsGovernment,
            "login.partner.microsoftonline.cn" | "login.chinacloudapi.cn" => Cloud::China,
            _ if host.ends_with(".ciamlogin.com") => Cloud::ExternalId(host),
            _ => Cloud::Other,
        }
    }

    /// Where this cloud's users sign in, and Microsoft explains its error
    /// codes (`https://<login host>/error?code=…`).
    pub fn login_host(&self) -> &str {
        match self {
            Cloud::Global | Cloud::Other => "login.microsoftonline.com",
            Cloud::UsGovernment => "login.microsoftonline.us",
            Cloud::China => "login.partner.microsoftonline.cn",
            Cloud::ExternalId(host) => host,
        }
    }

    pub fn is_entra(&self) -> bool {
        *self != Cloud::Other
    }

    /// The issuer of this cloud's v1 access tokens, `{tenantid}` standing
    /// for the tenant (what Entra issues for an API whose manifest leaves
    /// `accessTokenAcceptedVersion` unset); none outside Entra's clouds.
    pub fn v1_issuer(&self) -> Option<&'static str> {
        match self {
            Cloud::Global | Cloud::UsGovernment => Some("https://sts.windows.net/{tenantid}/"),
            Cloud::China => Some("https://sts.chinacloudapi.cn/{tenantid}/"),
            Cloud::ExternalId(_) | Cloud::Other => None,
        }
    }

    /// Microsoft Graph's base URL for this cloud's tenants
    /// (<https://learn.microsoft.com/graph/deployments>); none outside
    /// Entra. External ID tenants use the global Graph.
    pub fn graph_url(&self) -> Option<&'static str> {
        match self {
            Cloud::Global | Cloud::ExternalId(_) => Some("https://graph.microsoft.com"),
            Cloud::UsGovernment => Some("https://graph.microsoft.us"),
            Cloud::China => Some("https://microsoftgraph.chinacloudapi.cn"),
            Cloud::Other => None,
        }
    }
}

impl std::fmt::Display for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cloud::Global => "Microsoft Entra ID, global cloud",
            Cloud::UsGovernment => "Microsoft Entra ID, US Government cloud",
            Cloud::China => "Microsoft Entra ID, China cloud operated by 21Vianet",
            Cloud::ExternalId(_) => "Microsoft Entra External ID",
            Cloud::Other => "not Microsoft Entra ID: generic OpenID Connect",
        })
    }
}

/// Whether `issuer`'s tenant segment (`https://<host>/<tenant>/v2.0`) names
/// no one tenant: `common`, `organizations` or `consumers`, whatever the
/// host (every cloud has them).
pub fn is_multi_tenant(issuer: &str) -> bool {
    let path = issuer
        .parse::<Uri>()
        .map(|uri| uri.path().to_owned())
        .unwrap_or_default();
    let tenant = path.trim_start_matches('/').split('/').next().unwrap_or("");
    matches!(
        tenant.to_ascii_lowercase().as_str(),
        "common" | "organizations" | "consumers"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cloud_is_told_by_its_host() {
        let tenant = "7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b";
        for (issuer, cloud, login) in [
            (
                "https://login.microsoftonline.com/{t}/v2.0",
                Cloud::Global,
                "login.microsoftonline.com",
            ),
            (
                "https://login.microsoftonline.us/{t}/v2.0",
                Cloud::UsGovernment,
                "login.microsoftonline.us",
            ),
            (
                "https://login.partner.microsoftonline.cn/{t}/v2.0",
                Cloud::China,
                "login.partner.microsoftonline.cn",
            ),
            (
                "https://Contoso.ciamlogin.com/{t}/v2.0",
                Cloud::ExternalId("contoso.ciamlogin.com".into()),
                "contoso.ciamlogin.com",
            ),
            (
                "https://idp.example.com/{t}/v2.0",
                Cloud::Other,
                "login.microsoftonline.com",
            ),
            // A look-alike is not Entra.
            (
                "https://login.microsoftonline.com.evil.example/{t}/v2.0",
                Cloud::Other,
                "login.microsoftonline.com",
            ),
        ] {
            let issuer = issuer.replace("{t}", tenant);
            assert_eq!(Cloud::of_issuer(&issuer), cloud, "{issuer}");
            assert_eq!(Cloud::of_issuer(&issuer).login_host(), login);
        }
    }

    #[test]
    fn each_cloud_has_its_own_graph_and_v1_issuer() {
        for (issuer, graph) in [
            (
                "https://login.microsoftonline.com/t/v2.0",
                Some("https://graph.microsoft.com"),
            ),
            (
                "https://login.microsoftonline.us/t/v2.0",
                Some("https://graph.microsoft.us"),
            ),
            (
                "https://login.partner.microsoftonline.cn/t/v2.0",
                Some("https://microsoftgraph.chinacloudapi.cn"),
            ),
            (
                "https://contoso.ciamlogin.com/t/v2.0",
                Some("https://graph.microsoft.com"),
            ),
            ("https://idp.example.com/t", None),
        ] {
            assert_eq!(Cloud::of_issuer(issuer).graph_url(), graph, "{issuer}");
        }
        for (issuer, v1) in [
            (
                "https://login.microsoftonline.com/t/v2.0",
                Some("https://sts.windows.net/{tenantid}/"),
            ),
            (
                "https://login.microsoftonline.us/t/v2.0",
                Some("https://sts.windows.net/{tenantid}/"),
            ),
            (
                "https://login.partner.microsoftonline.cn/t/v2.0",
                Some("https://sts.chinacloudapi.cn/{tenantid}/"),
            ),
            ("https://idp.example.com/t", None),
        ] {
            assert_eq!(Cloud::of_issuer(issuer).v1_issuer(), v1, "{issuer}");
        }
    }

    #[test]
    fn the_tenant_segment_not_the_host_makes_an_issuer_multi_tenant() {
        for issuer in [
            "https://login.microsoftonline.com/organizations/v2.0",
            "https://login.microsoftonline.us/common/v2.0",
            "https://login.partner.microsoftonline.cn/Organizations/v2.0/",
            "https://login.microsoftonline.com/consumers/v2.0",
            "https://127.0.0.1:8443/organizations/v2.0",
        ] {
            assert!(is_multi_tenant(issuer), "{issuer}");
        }
        for issuer in [
            "https://login.microsoftonline.com/7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b/v2.0",
            "https://contoso.ciamlogin.com/7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b/v2.0",
            "https://idp.example.com/realms/common-people",
            "https://idp.example.com/",
        ] {
            assert!(!is_multi_tenant(issuer), "{issuer}");
        }
    }
}

//! Who may pass once signed in: tenants, email domains, users, groups and
//! app roles, and with what sign-in (Entra authentication contexts). Every
//! list that is set must be satisfied (any entry of it, every one of
//! `require_acrs`); an empty policy admits every signed-in user.

use serde::Deserialize;

use crate::auth::identity::Identity;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Entra tenant ids (`tid`).
    pub allowed_tenants: Vec<String>,
    /// Domains of the user's email or UPN, e.g. `contoso.com`.
    pub allowed_email_domains: Vec<String>,
    /// UPNs, emails or object ids.
    pub allowed_users: Vec<String>,
    /// Group object ids (Entra's `groups` claim carries ids, not names).
    pub allowed_groups: Vec<String>,
    /// App roles defined on the app registration (`roles` claim).
    pub allowed_roles: Vec<String>,
    /// Entra authentication context ids (`c1`…) the sign-in must have
    /// satisfied (`acrs` claim): a user without them is sent back through
    /// sign-in asking for them (a step-up, such as MFA for admin pages).
    pub require_acrs: Vec<String>,
}

/// Why a signed-in user was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("your organisation (tenant) is not among those allowed here")]
    Tenant,
    #[error("your email domain is not among those allowed here")]
    EmailDomain,
    #[error("your account is not among those allowed here")]
    User,
    #[error("you are not a member of a group allowed here")]
    Groups,
    #[error("you do not hold an app role allowed here")]
    Roles,
    /// An app-only token passes only a route that names one of its roles.
    #[error("an application's own token is admitted only where an app role rule allows it")]
    AppNeedsRole,
    /// Entra leaves `groups` out for users in more than 200 groups, and
    /// Microsoft Graph did not tell them: their membership is unknown,
    /// which is not the same as "none".
    #[error(
        "your account is in more groups than Microsoft Entra ID puts in a sign-in token, \
         and the gateway could not look them up in Microsoft Graph, so group membership \
         cannot be checked here; an admin must grant the app the Microsoft Graph \
         application permissions User.Read.All and GroupMember.Read.All (with admin \
         consent), then you sign in again; or grant access through an app role"
    )]
    GroupsOverage,
    /// The sign-in did not satisfy these authentication contexts: a
    /// step-up can.
    #[error("this page needs a stronger sign-in (authentication context {})", .0.join(", "))]
    StepUp(Vec<String>),
    /// `oidc.groups_overage = "deny"`.
    #[error(
        "your account is in more groups than Microsoft Entra ID puts in a sign-in token, \
         and this gateway is set to refuse such accounts; an admin can change that \
         (oidc.groups_overage = \"graph\") or grant access through an app role"
    )]
    GroupsOverageRefused,
}

impl Denial {
    /// A stable name for logs and JSON answers.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Tenant => "tenant_not_allowed",
            Denial::EmailDomain => "email_domain_not_allowed",
            Denial::User => "user_not_allowed",
            Denial::Groups => "group_not_allowed",
            Denial::Roles => "role_not_allowed",
            Denial::GroupsOverage => "groups_overage",
            Denial::GroupsOverageRefused => "groups_overage_refused",
            Denial::StepUp(_) => "step_up_required",
            Denial::AppNeedsRole => "app_needs_role",
        }
    }
}

/// The authentication contexts of `required` that `identity`'s sign-in
/// did not satisfy.
pub fn unmet<'a>(
    required: &'a [String],
    identity: &'a Identity,
) -> impl Iterator<Item = &'a String> + 'a {
    required.iter().filter(|acr| !identity.acrs.contains(acr))
}

impl Policy {
    pub fn check(&self, identity: &Identity) -> Result<(), Denial> {
        if identity.app && self.allowed_roles.is_empty() {
            return Err(Denial::AppNeedsRole);
        }
        let any =
            |allowed: &[String], value: &str| allowed.iter().any(|a| a.eq_ignore_ascii_case(value));
        if !self.allowed_tenants.is_empty()
            && !identity
                .tenant
                .as_deref()
                .is_some_and(|t| any(&self.allowed_tenants, t))
        {
            return Err(Denial::Tenant);
        }
        if !self.allowed_email_domains.is_empty() {
            let domains = [identity.email.as_deref(), Some(identity.username.as_str())]
                .into_iter()
                .flatten()
                .filter_map(|address| address.rsplit_once('@').map(|(_, domain)| domain));
            if !domains
                .into_iter()
                .any(|d| any(&self.allowed_email_domains, d))
            {
                return Err(Denial::EmailDomain);
            }
        }
        if !self.allowed_users.is_empty() {
            let names = [
                Some(identity.username.as_str()),
                identity.email.as_deref(),
                Some(identity.user_id.as_str()),
            ];
            if !names
                .into_iter()
                .flatten()
                .any(|n| any(&self.allowed_users, n))
            {
                return Err(Denial::User);
            }
        }
        if !self.allowed_groups.is_empty()
            && !identity.groups.iter().any(|g| any(&self.allowed_groups, g))
        {
            return Err(if identity.groups_unknown() {
                Denial::GroupsOverage
            } else {
                Denial::Groups
            });
        }
        if !self.allowed_roles.is_empty()
            && !identity.roles.iter().any(|r| any(&self.allowed_roles, r))
        {
            return Err(Denial::Roles);
        }
        // Last: a step-up is worth asking for only of a user who may pass.
        let missing: Vec<String> = unmet(&self.require_acrs, identity).cloned().collect();
        if !missing.is_empty() {
            return Err(Denial::StepUp(missing));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(groups: &[&str], roles: &[&str], overage: bool) -> Identity {
        Identity {
            subject: "s".into(),
            user_id: "00000000-0000-0000-0000-00000000000a".into(),
            username: "alice@contoso.com".into(),
            email: Some("alice@mail.contoso.com".into()),
            name: None,
            tenant: Some("tid-1".into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            groups_overage: overage,
            groups_from_graph: false,
            acrs: Vec::new(),
            app: false,
        }
    }

    fn policy(f: impl FnOnce(&mut Policy)) -> Policy {
        let mut p = Policy::default();
        f(&mut p);
        p
    }

    #[test]
    fn an_app_passes_only_where_a_role_rule_admits_it() {
        let app = Identity {
            app: true,
            ..user(&[], &["Console.Automation"], false)
        };
        assert_eq!(Policy::default().check(&app), Err(Denial::AppNeedsRole));
        let roles = policy(|p| p.allowed_roles = vec!["Console.Automation".into()]);
        assert_eq!(roles.check(&app), Ok(()));
        let other = policy(|p| p.allowed_roles = vec!["Console.Admin".into()]);
        assert_eq!(other.check(&app), Err(Denial::Roles));
    }

    #[test]
    fn empty_policy_admits_any_signed_in_user() {
        assert_eq!(Policy::default().check(&user(&[], &[], false)), Ok(()));
    }

    #[test]
    fn each_rule_admits_and_refuses() {
        let alice = user(&["g-ops"], &["Console.Admin"], false);
        let cases = [
            (policy(|p| p.allowed_tenants = vec!["TID-1".into()]), Ok(())),
            (
                policy(|p| p.allowed_tenants = vec!["tid-2".into()]),
                Err(Denial::Tenant),
            ),
            (
                policy(|p| p.allowed_email_domains = vec!["contoso.com".into()]),
                Ok(()),
            ),
            (
                policy(|p| p.allowed_email_domains = vec!["mail.contoso.com".into()]),
                Ok(()),
            ),
            (
                policy(|p| p.allowed_email_domains = vec!["fabrikam.com".into()]),
                Err(Denial::EmailDomain),
            ),
            (
                policy(|p| p.allowed_users = vec!["ALICE@contoso.com".into()]),
                Ok(()),
            ),
            (
                policy(|p| p.allowed_users = vec!["bob@contoso.com".into()]),
                Err(Denial::User),
            ),
            (
                policy(|p| p.allowed_groups = vec!["g-ops".into(), "g-x".into()]),
                Ok(()),
            ),
            (
                policy(|p| p.allowed_groups = vec!["g-x".into()]),
                Err(Denial::Groups),
            ),
            (
                policy(|p| p.allowed_roles = vec!["Console.Admin".into()]),
                Ok(()),
            ),
            (
                policy(|p| p.allowed_roles = vec!["Console.Owner".into()]),
                Err(Denial::Roles),
            ),
        ];
        for (policy, expected) in cases {
            assert_eq!(policy.check(&alice), expected, "{policy:?}");
        }
    }

    #[test]
    fn groups_overage_is_refused_with_its_own_reason_not_as_no_groups() {
        let overage = user(&[], &[], true);
        let groups = policy(|p| p.allowed_groups = vec!["g-ops".into()]);
        assert_eq!(groups.check(&overage), Err(Denial::GroupsOverage));
        assert!(Denial::GroupsOverage.to_string().contains("app role"));
        // Rules that do not involve groups are unaffected.
        let roles = policy(|p| p.allowed_roles = vec!["Console.User".into()]);
        assert_eq!(roles.check(&user(&[], &["Console.User"], true)), Ok(()));
    }

    #[test]
    fn a_step_up_is_asked_for_what_the_sign_in_lacks_and_only_of_who_may_pass() {
        let admins = policy(|p| {
            p.allowed_roles = vec!["Console.Admin".into()];
            p.require_acrs = vec!["c1".into(), "c2".into()];
        });
        let mut admin = user(&[], &["Console.Admin"], false);
        admin.acrs = vec!["c2".into()];
        assert_eq!(admins.check(&admin), Err(Denial::StepUp(vec!["c1".into()])));
        admin.acrs.push("c1".into());
        assert_eq!(admins.check(&admin), Ok(()));
        let mut reader = user(&[], &["Console.User"], false);
        reader.acrs = vec![];
        assert_eq!(
            admins.check(&reader),
            Err(Denial::Roles),
            "no step-up first"
        );
    }
}

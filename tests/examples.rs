//! The deployment examples stay valid as the configuration evolves: the
//! settings they give authgate, with the preset they mount, pass
//! `authgate check-config`.

mod common;

use std::path::Path;

use common::run_authgate;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// `AUTHGATE_*` settings of an example, in either of the two YAML shapes
/// the examples use (`KEY: value` and `{ name: KEY, value: ... }`).
fn settings(yaml: &str) -> Vec<(String, String)> {
    yaml.lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches("- ");
            if let Some(rest) = line.strip_prefix("{ name: ") {
                let (name, rest) = rest.split_once(", value: ")?;
                let value = rest.trim_end_matches('}').trim().trim_matches('"');
                return Some((name.to_owned(), value.to_owned()));
            }
            let (name, value) = line.split_once(": ")?;
            Some((name.to_owned(), value.trim().trim_matches('"').to_owned()))
        })
        .filter(|(name, _)| name.starts_with("AUTHGATE_"))
        .collect()
}

/// Runs check-config in a directory laid out like the container: the
/// preset at config/authgate.toml, secret files where the example says.
fn check(example: &str, env: Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/authgate.toml"),
        repo("config/rustdesk.toml"),
    )
    .unwrap();
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(name, value)| {
            if !name.ends_with("_FILE") {
                return (name, value);
            }
            // A secret file as Docker or Kubernetes would mount it.
            let file = dir.path().join(name.to_lowercase());
            std::fs::write(
                &file,
                "c2VjcmV0LXZhbHVlLW9mLWF0LWxlYXN0LTMyLWJ5dGVzLWZvci10ZXN0cw\n",
            )
            .unwrap();
            (name, file.display().to_string())
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, stdout, stderr) = run_authgate(dir.path(), &["check-config"], &env);
    assert!(status.success(), "{example}: {stderr}{stdout}");
    assert!(stdout.contains("/api/oidc/callback"), "{example}: {stdout}");
}

#[test]
fn the_docker_compose_example_configures_a_valid_gateway() {
    let env = settings(&repo("examples/docker-compose.yml"));
    assert!(
        env.iter()
            .any(|(k, _)| k == "AUTHGATE_OIDC_CLIENT_SECRET_FILE"),
        "{env:?}"
    );
    check("docker-compose.yml", env);
}

#[test]
fn the_kubernetes_examples_configure_a_valid_gateway() {
    let env = settings(&repo("examples/kubernetes/deployment.yaml"));
    assert!(
        env.iter()
            .any(|(k, v)| k == "AUTHGATE_LISTEN" && v == "0.0.0.0:8443"),
        "{env:?}"
    );
    check("deployment.yaml", env.clone());

    // Workload identity: no secret, the token file from the platform.
    let mut federated: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k != "AUTHGATE_OIDC_CLIENT_SECRET_FILE")
        .collect();
    federated.extend(settings(&repo(
        "examples/kubernetes/workload-identity.yaml",
    )));
    let token = tempfile::NamedTempFile::new().unwrap();
    federated.push((
        "AZURE_FEDERATED_TOKEN_FILE".into(),
        token.path().display().to_string(),
    ));
    check("workload-identity.yaml", federated);
}

#[test]
fn the_kubernetes_config_map_is_the_preset() {
    let config_map = repo("examples/kubernetes/authgate-config.yaml");
    let embedded: Vec<&str> = config_map
        .split_once("authgate.toml: |\n")
        .unwrap()
        .1
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    let preset = repo("config/rustdesk.toml");
    assert_eq!(embedded, preset.lines().collect::<Vec<_>>());
}

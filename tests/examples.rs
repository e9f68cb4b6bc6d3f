//! The deployment examples stay valid as the configuration evolves: the
//! settings they give authgate, with the preset they mount, pass
//! `authgate check-config`.

mod common;

use std::path::Path;

use common::run_authgate;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// An example's YAML documents, read by a YAML parser: a file it
/// refuses would be refused by `kubectl` and `docker compose` too.
fn documents(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&repo(path))
        .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

/// `AUTHGATE_*` settings of an example, wherever its documents give them:
/// a Compose `environment` map or Kubernetes `{ name, value }` entries.
fn settings(path: &str) -> Vec<(String, String)> {
    fn text(value: &Yaml) -> String {
        match value {
            Yaml::String(s) | Yaml::Real(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            Yaml::Boolean(b) => b.to_string(),
            _ => String::new(),
        }
    }
    fn walk(node: &Yaml, found: &mut Vec<(String, String)>) {
        match node {
            Yaml::Hash(map) => {
                let field = |name: &str| map.get(&Yaml::String(name.to_owned()));
                if let (Some(Yaml::String(name)), Some(value)) = (field("name"), field("value")) {
                    if name.starts_with("AUTHGATE_") {
                        found.push((name.clone(), text(value)));
                    }
                }
                for (key, value) in map {
                    match key {
                        Yaml::String(key) if key.starts_with("AUTHGATE_") => {
                            found.push((key.clone(), text(value)));
                        }
                        _ => walk(value, found),
                    }
                }
            }
            Yaml::Array(items) => items.iter().for_each(|item| walk(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for document in documents(path) {
        walk(&document, &mut found);
    }
    found
}

#[test]
fn every_example_is_valid_yaml() {
    for path in [
        "examples/docker-compose.yml",
        "examples/kubernetes/deployment.yaml",
        "examples/kubernetes/workload-identity.yaml",
        "examples/kubernetes/workload-identity-patch.yaml",
        "examples/kubernetes/authgate-config.yaml",
        "examples/kubernetes/secret.yaml",
        "examples/kubernetes/replicas.yaml",
        "examples/docker-compose.replicas.yml",
    ] {
        assert!(!documents(path).is_empty(), "{path} holds no document");
    }
}

/// Runs check-config in a directory laid out like the container: the
/// RustDesk preset at config/authgate.toml, secret files where the
/// example says; returns what it printed.
fn check(example: &str, env: Vec<(String, String)>) -> String {
    check_with("config/rustdesk.toml", example, env)
}

/// The same with `config` (a file of the repository) as the image's.
fn check_with(config: &str, example: &str, env: Vec<(String, String)>) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/authgate.toml"), repo(config)).unwrap();
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
    stdout
}

/// The replica examples run the image's own config/authgate.toml, with
/// sessions in Redis.
#[test]
fn the_replica_examples_configure_gateways_sharing_redis() {
    for example in [
        "examples/kubernetes/replicas.yaml",
        "examples/docker-compose.replicas.yml",
    ] {
        let env = settings(example);
        assert!(
            env.iter()
                .any(|(k, v)| k == "AUTHGATE_SESSION_STORE" && v == "redis"),
            "{example}: {env:?}"
        );
        let printed = check_with("config/authgate.toml", example, env);
        assert!(
            printed.contains("kept in Redis: redis://"),
            "{example}: {printed}"
        );
    }
}

#[test]
fn the_docker_compose_example_configures_a_valid_gateway() {
    let env = settings("examples/docker-compose.yml");
    assert!(
        env.iter()
            .any(|(k, _)| k == "AUTHGATE_OIDC_CLIENT_SECRET_FILE"),
        "{env:?}"
    );
    check("docker-compose.yml", env);
}

#[test]
fn the_kubernetes_examples_configure_a_valid_gateway() {
    let env = settings("examples/kubernetes/deployment.yaml");
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
    federated.extend(settings("examples/kubernetes/workload-identity-patch.yaml"));
    let token = tempfile::NamedTempFile::new().unwrap();
    federated.push((
        "AZURE_FEDERATED_TOKEN_FILE".into(),
        token.path().display().to_string(),
    ));
    check("workload-identity.yaml", federated);
}

#[test]
fn the_kubernetes_config_map_is_the_preset() {
    let documents = documents("examples/kubernetes/authgate-config.yaml");
    let embedded = documents[0]["data"]["authgate.toml"]
        .as_str()
        .expect("the ConfigMap carries authgate.toml");
    assert_eq!(embedded, repo("config/rustdesk.toml"));
}

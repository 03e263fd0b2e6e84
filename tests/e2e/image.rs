//! `make image` builds the operator's image with no container engine
//! (`e2e/scripts/build-image.sh`); users with Docker build it from the `Dockerfile`. Both
//! must describe the same image: same user, entrypoint, command, port, working directory,
//! the single binary, and the files the Dockerfile's distroless base brings.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The final stage of the Dockerfile: its instructions after the last `FROM`, and the
/// default of the base image's build argument.
struct FinalStage {
    base: String,
    instructions: Vec<(String, String)>,
}

fn dockerfile() -> FinalStage {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut args = BTreeMap::new();
    let mut stage = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let word = word.to_ascii_uppercase();
        match word.as_str() {
            "ARG" if stage.is_none() => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
            "FROM" => {
                let image = rest.split_whitespace().next().unwrap_or_default();
                let base = match image.strip_prefix("${").and_then(|s| s.strip_suffix('}')) {
                    Some(arg) => args.get(arg).cloned().unwrap_or_default(),
                    None => image.to_string(),
                };
                stage = Some(FinalStage {
                    base,
                    instructions: vec![],
                });
            }
            _ => {
                if let Some(stage) = stage.as_mut() {
                    stage.instructions.push((word, rest.trim().to_string()));
                }
            }
        }
    }
    stage.expect("a FROM")
}

fn instruction<'a>(stage: &'a FinalStage, word: &str) -> Vec<&'a str> {
    stage
        .instructions
        .iter()
        .filter(|(w, _)| w == word)
        .map(|(_, rest)| rest.as_str())
        .collect()
}

fn described() -> Value {
    let out = Command::new("bash")
        .arg(repo().join("e2e/scripts/build-image.sh"))
        .arg("--describe")
        .output()
        .expect("build-image.sh runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn the_dockerfile_and_make_image_describe_the_same_image() {
    let stage = dockerfile();
    let image = described();
    let config = &image["config"];
    let files = image["files"].as_array().unwrap();
    let file = |path: &str| files.iter().find(|f| f["path"] == path);

    // USER, ENTRYPOINT, CMD, EXPOSE of the final stage, as the image config has them.
    assert_eq!(instruction(&stage, "USER"), vec![config["User"].as_str().unwrap()]);
    let exec_form = |word: &str| -> Value {
        let v = instruction(&stage, word);
        assert_eq!(v.len(), 1, "one {word}");
        serde_json::from_str(v[0]).unwrap_or_else(|e| panic!("{word} in exec form: {e}"))
    };
    assert_eq!(exec_form("ENTRYPOINT"), config["Entrypoint"]);
    assert_eq!(exec_form("CMD"), config["Cmd"]);
    let exposed: Vec<String> = instruction(&stage, "EXPOSE")
        .iter()
        .flat_map(|p| p.split_whitespace())
        .map(|p| {
            if p.contains('/') {
                p.to_string()
            } else {
                format!("{p}/tcp")
            }
        })
        .collect();
    let ports: Vec<String> = config["ExposedPorts"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(exposed, ports);

    // The only file the final stage adds is the binary, where the entrypoint runs it.
    let copies = instruction(&stage, "COPY");
    assert_eq!(copies.len(), 1, "{copies:?}");
    let dest = copies[0].split_whitespace().last().unwrap();
    assert_eq!(dest, config["Entrypoint"][0]);
    let binary = file(dest).expect("the binary");
    assert_eq!(binary["type"], "file");
    assert_eq!(binary["mode"], "0o755");
    assert!(
        stage
            .instructions
            .iter()
            .all(|(w, _)| ["COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD"].contains(&w.as_str())),
        "the final stage does only what is compared here: {:?}",
        stage.instructions
    );

    // What the Dockerfile's base (distroless static, nonroot) brings, which the script
    // writes itself: the nonroot user as USER names it, the CA bundle, a writable /tmp,
    // the nonroot home as working directory, SSL_CERT_FILE; and no shell, nothing else
    // executable.
    assert!(
        stage.base.starts_with("distroless/static-debian12:") && stage.base.ends_with(":nonroot"),
        "base {} (the files below are what that base has)",
        stage.base
    );
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["WorkingDir"], "/home/nonroot");
    let home = file("/home/nonroot").expect("/home/nonroot");
    assert_eq!((home["uid"].as_u64(), home["gid"].as_u64()), (Some(65532), Some(65532)));
    assert_eq!(file("/tmp").expect("/tmp")["mode"], "0o1777");
    assert!(file("/etc/ssl/certs/ca-certificates.crt").is_some());
    assert!(file("/etc/passwd").is_some() && file("/etc/group").is_some());
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"),
        "{env:?}"
    );
    assert!(file("/bin/sh").is_none() && file("/bin").is_none(), "no shell");
    let executables: Vec<&str> = files
        .iter()
        .filter(|f| {
            f["type"] == "file"
                && i64::from_str_radix(f["mode"].as_str().unwrap().trim_start_matches("0o"), 8).unwrap() & 0o111 != 0
        })
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(executables, vec![dest], "the single binary");
}

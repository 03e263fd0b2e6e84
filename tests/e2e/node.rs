//! The local node (`make up`): a real kubelet with containerd, runc and CNI. A pod from a
//! locally built image runs there, mounts a Secret as the README tells users to (a volume,
//! no `subPath`), and sees the Secret's update delivered by the kubelet itself: a new
//! timestamped directory and an atomic swap of the `..data` symlink, in the running
//! container, with no restart; and a `subPath` mount of the same key in the same container
//! never updates (the README's warning).

use std::time::Duration;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Patch, PatchParams};

use crate::harness::*;

fn reader_pod(name: &str, secret: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: reader
      image: {BUSYBOX_IMAGE}
      imagePullPolicy: Never
      command: ["sleep", "3600"]
      volumeMounts:
        - {{name: creds, mountPath: /var/run/secrets/kube-sts.io, readOnly: true}}
        - {{name: creds, mountPath: /subpath/config, subPath: config, readOnly: true}}
  volumes: [{{name: creds, secret: {{secretName: {secret}}}}}]
"#
    )
}

const MOUNT: &str = "/var/run/secrets/kube-sts.io";

#[tokio::test]
async fn a_pod_on_the_node_sees_a_secret_update_through_the_kubelets_data_swap_and_a_subpath_mount_does_not() {
    let ns = TestNamespace::new("node").await;
    ns.create_secret("creds", &[("config", "one")]).await;
    ns.apply_ok(&reader_pod("reader", "creds"));

    let pod = eventually("the reader pod runs on the node", Duration::from_secs(120), || {
        pod_ready(&ns.client, &ns.name, "reader")
    })
    .await;
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    assert!(!node.is_empty(), "the pod is bound to a node");
    let started = pod.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0]
        .state
        .as_ref()
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.clone())
        .expect("the container runs");

    // What the kubelet wrote: each key a symlink into ..data, itself a symlink to a
    // timestamped directory.
    let first = eventually("the volume's files", Duration::from_secs(30), || {
        let ns = ns.name.clone();
        async move {
            pod_exec(
                &ns,
                "reader",
                &[
                    "sh",
                    "-c",
                    &format!("readlink {MOUNT}/..data; readlink {MOUNT}/config; cat {MOUNT}/config; echo; cat /subpath/config"),
                ],
            )
        }
    })
    .await;
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines.len(), 4, "{first:?}");
    let first_dir = lines[0].to_string();
    assert!(
        first_dir.starts_with("..") && first_dir != "..data",
        "..data -> {first_dir}"
    );
    assert_eq!(lines[1], "..data/config", "the key is a symlink into ..data");
    assert_eq!(lines[2], "one");
    assert_eq!(lines[3], "one", "the subPath mount has the key's content");

    // The update, through the API as the operator writes it.
    let patch = Secret {
        data: Some([("config".to_string(), ByteString(b"two".to_vec()))].into()),
        ..Default::default()
    };
    ns.secrets()
        .patch("creds", &PatchParams::apply("e2e-test").force(), &Patch::Apply(&patch))
        .await
        .expect("update the Secret");

    let after = eventually(
        "the kubelet delivers the update into the running container",
        Duration::from_secs(180),
        || {
            let ns = ns.name.clone();
            async move {
                let out = pod_exec(
                    &ns,
                    "reader",
                    &[
                        "sh",
                        "-c",
                        &format!("cat {MOUNT}/config; echo; cat /subpath/config; echo; readlink {MOUNT}/..data; ls -a {MOUNT}"),
                    ],
                )?;
                out.starts_with("two\n").then_some(out)
            }
        },
    )
    .await;
    let lines: Vec<&str> = after.lines().collect();
    // The kubelet has delivered "two" into this container's volume, and the subPath mount
    // of the same key still shows what it was bound to at container start.
    assert_eq!(lines[1], "one", "a subPath mount does not update: {after:?}");
    let new_dir = lines[2];
    assert!(
        new_dir.starts_with("..") && new_dir != "..data" && new_dir != first_dir,
        "..data now points to a new directory: {after:?}"
    );
    let entries: Vec<&str> = lines[3..].to_vec();
    assert!(entries.contains(&new_dir), "{entries:?}");
    assert!(
        !entries.contains(&first_dir.as_str()),
        "the old directory is gone after the swap: {entries:?}"
    );

    // The same container saw it: no restart.
    let pod = pod_ready(&ns.client, &ns.name, "reader").await.expect("still running");
    let status = &pod.status.unwrap().container_statuses.unwrap()[0];
    assert_eq!(status.restart_count, 0);
    assert_eq!(
        status
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone()),
        Some(started)
    );
}

/// The first line of the STS peer's answer to `head` (a request head, no body) at `addr`.
async fn status_line(addr: &str, head: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the STS peer listens");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(stream).read_line(&mut line).await.unwrap();
    line.trim_end().to_string()
}

/// What pods reach of the STS peer (its listener on the node link) is STS and IAM only: not
/// its admin API, which could reset the peer or turn its IAM checks off, nor the routing
/// header that reaches the peer without enforcement. The host's own listener has both.
#[tokio::test]
async fn pods_reach_no_admin_api_of_the_sts_peer() {
    let address = |url: &str| url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let local = address(&env().aws["AWS_ENDPOINT_URL_STS"]);
    let for_pods = address(&sts_url_for_pods());
    let admin = "GET /moto-api/data.json HTTP/1.1\r\nHost: sts\r\nConnection: close\r\n\r\n";
    let rerouted = "GET / HTTP/1.1\r\nHost: sts\r\nX-Kube-Sts-Upstream: noauth\r\nConnection: close\r\n\r\n";
    assert!(
        status_line(&for_pods, admin).await.contains(" 403 "),
        "the admin API from pods"
    );
    assert!(
        status_line(&for_pods, rerouted).await.contains(" 403 "),
        "the routing header from pods"
    );
    assert!(
        status_line(&local, admin).await.contains(" 200 "),
        "the admin API on the host"
    );
}

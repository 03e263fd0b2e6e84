#!/usr/bin/env python3
"""Assemble a single-layer OCI image archive with no container engine.

The result is an OCI image layout in a tar file (oci-layout, index.json,
blobs/sha256/...) that `ctr -n k8s.io images import` takes as it is. Output is
reproducible: the same inputs give the same bytes (sorted entries, zero
timestamps, root-owned unless told otherwise, gzip without a name or time).

  oci-image.py --ref NAME:TAG --out IMAGE.tar
      [--file SRC:DEST[:MODE[:UID:GID]]]...  copy a file (mode in octal)
      [--text DEST=CONTENT]...                 a file (0644) with this content (\\n for newlines)
      [--symlink LINK:TARGET]...
      [--dir PATH[:MODE[:UID:GID]]]...
      [--user U:G] [--entrypoint JSON] [--cmd JSON] [--env K=V]... [--workdir DIR]
      [--expose PORT/tcp]... [--label K=V]...
      [--print-config]  print the image config JSON on stdout as well
      [--describe]      print the image's config and its files (path, type, mode,
                        owner) as JSON on stdout, and write nothing

Parent directories are added (0755, root) where not given.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def split_owner(parts, default_mode):
    mode = int(parts[0], 8) if parts and parts[0] else default_mode
    uid = int(parts[1]) if len(parts) > 1 else 0
    gid = int(parts[2]) if len(parts) > 2 else 0
    return mode, uid, gid


def build_layer(args):
    entries = {}  # path -> (TarInfo, bytes or None)

    def add_dir(path, mode=0o755, uid=0, gid=0, explicit=False):
        path = path.strip("/")
        if not path:
            return
        if path in entries and not explicit:
            return
        parent = os.path.dirname(path)
        if parent:
            add_dir(parent)
        ti = tarfile.TarInfo(path + "/")
        ti.type = tarfile.DIRTYPE
        ti.mode, ti.uid, ti.gid = mode, uid, gid
        entries[path] = (ti, None)

    def add_file(dest, data, mode, uid=0, gid=0):
        dest = dest.strip("/")
        add_dir(os.path.dirname(dest))
        ti = tarfile.TarInfo(dest)
        ti.size = len(data)
        ti.mode, ti.uid, ti.gid = mode, uid, gid
        entries[dest] = (ti, data)

    for spec in args.dir:
        path, *rest = spec.split(":")
        mode, uid, gid = split_owner(rest, 0o755)
        add_dir(path, mode, uid, gid, explicit=True)
    for spec in args.file:
        src, dest, *rest = spec.split(":")
        with open(src, "rb") as f:
            data = f.read()
        default = 0o755 if os.access(src, os.X_OK) else 0o644
        mode, uid, gid = split_owner(rest, default)
        add_file(dest, data, mode, uid, gid)
    for spec in args.text:
        dest, content = spec.split("=", 1)
        add_file(dest, content.replace("\\n", "\n").encode(), 0o644)
    for spec in args.symlink:
        link, target = spec.split(":", 1)
        link = link.strip("/")
        add_dir(os.path.dirname(link))
        ti = tarfile.TarInfo(link)
        ti.type = tarfile.SYMTYPE
        ti.linkname = target
        ti.mode = 0o777
        entries[link] = (ti, None)

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            ti, data = entries[path]
            ti.mtime = 0
            ti.uname = ti.gname = ""
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return raw.getvalue(), entries


def describe(entries):
    kinds = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.REGTYPE: "file"}
    out = []
    for path in sorted(entries):
        ti, _ = entries[path]
        item = {"path": "/" + path, "type": kinds.get(ti.type, "other"), "mode": oct(ti.mode), "uid": ti.uid, "gid": ti.gid}
        if ti.type == tarfile.SYMTYPE:
            item["target"] = ti.linkname
        out.append(item)
    return out


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="image reference, e.g. kube-sts.local/pause:1")
    ap.add_argument("--out", required=True)
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--text", action="append", default=[])
    ap.add_argument("--symlink", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--user", default="")
    ap.add_argument("--entrypoint", default="null")
    ap.add_argument("--cmd", default="null")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--workdir", default="")
    ap.add_argument("--expose", action="append", default=[])
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--print-config", action="store_true")
    ap.add_argument("--describe", action="store_true")
    args = ap.parse_args()

    name, _, tag = args.ref.rpartition(":")
    if not name or "/" in tag:
        sys.exit(f"oci-image: --ref needs NAME:TAG, got {args.ref!r}")

    layer_tar, entries = build_layer(args)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    layer_digest, layer_gz = blob(gzip.compress(layer_tar, compresslevel=6, mtime=0))

    image_config = {"Env": args.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if args.user:
        image_config["User"] = args.user
    if json.loads(args.entrypoint) is not None:
        image_config["Entrypoint"] = json.loads(args.entrypoint)
    if json.loads(args.cmd) is not None:
        image_config["Cmd"] = json.loads(args.cmd)
    if args.workdir:
        image_config["WorkingDir"] = args.workdir
    if args.expose:
        image_config["ExposedPorts"] = {p: {} for p in args.expose}
    if args.label:
        image_config["Labels"] = dict(l.split("=", 1) for l in args.label)
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2e/images/oci-image.py"}],
    }
    if args.describe:
        print(json.dumps({"ref": args.ref, "config": image_config, "files": describe(entries)}, indent=2, sort_keys=True))
        return
    config_digest, config_bytes = blob(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": len(layer_gz)}],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": args.ref, "org.opencontainers.image.ref.name": tag},
        }],
    }

    files = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode()),
    ]
    for digest, data in sorted([(config_digest, config_bytes), (manifest_digest, manifest_bytes), (layer_digest, layer_gz)]):
        files.append(("blobs/sha256/" + digest.split(":", 1)[1], data))
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs/", "blobs/sha256/"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(ti)
        for path, data in files:
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tar.addfile(ti, io.BytesIO(data))
    os.replace(tmp, args.out)
    if args.print_config:
        print(json.dumps(config, indent=2, sort_keys=True))
    print(f"oci-image: {args.ref} {manifest_digest} -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

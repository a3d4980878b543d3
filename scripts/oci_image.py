#!/usr/bin/env python3
"""Writes an OCI image layout (one layer) from a root filesystem directory.

Called by scripts/image.sh, which assembles the root filesystem; this part only packs
it. The layer is reproducible: entries in sorted order, every mtime SOURCE_DATE_EPOCH
(default 0), owners by rule rather than from the disk (root, except /data, which
belongs to 65532:65532), no user or group names, and a gzip header without a name or
time. The same root filesystem therefore always gives the same image digest.

Layout written (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
  OUT/oci-layout, OUT/index.json (the manifest, tagged with
  org.opencontainers.image.ref.name), OUT/blobs/sha256/{layer, config, manifest}.
"""

import argparse
import datetime
import gzip
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile

NONROOT = 65532
# Directories uid 65532 owns; everything else is root's and not writable by it.
OWNED_BY_NONROOT = {"data", "home/nonroot"}
# World-writable with the sticky bit, as /tmp always is.
STICKY = {"tmp"}

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}


def entries(rootfs):
    """Every path under rootfs, relative, parents before children, in sorted order."""
    for directory, dirs, files in os.walk(rootfs):
        dirs.sort()
        rel_dir = os.path.relpath(directory, rootfs)
        for name in sorted(dirs + files):
            yield os.path.normpath(os.path.join(rel_dir, name))


def tar_info(rootfs, rel, mtime):
    path = os.path.join(rootfs, rel)
    st = os.lstat(path)
    info = tarfile.TarInfo(rel)
    info.mtime = mtime
    info.uid = info.gid = NONROOT if rel in OWNED_BY_NONROOT else 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o1777 if rel in STICKY else 0o755
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        # Only two modes, from the executable bit: the host's umask must not matter.
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        info.mode = 0o777
    else:
        sys.exit(f"oci_image.py: {path}: only directories, files and symlinks belong in an image")
    return info


def write_layer(rootfs, tar_path, mtime):
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in entries(rootfs):
            info = tar_info(rootfs, rel, mtime)
            if info.type == tarfile.REGTYPE:
                with open(os.path.join(rootfs, rel), "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gzip_file(src, dst):
    with open(src, "rb") as fin, open(dst, "wb") as raw:
        # filename="" and mtime=0: nothing of this host or this moment in the header.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            shutil.copyfileobj(fin, gz, 1 << 20)


def put_blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rootfs", required=True)
    p.add_argument("--out", required=True, help="the OCI layout directory (replaced)")
    p.add_argument("--tag", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--license", required=True)
    p.add_argument("--arch", default=os.uname().machine)
    args = p.parse_args()

    arch = ARCHITECTURES.get(args.arch)
    if arch is None:
        sys.exit(f"oci_image.py: no OCI architecture known for {args.arch}")
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )

    # Built beside OUT and moved into place at the end: a failed run leaves no half layout.
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".oci-", dir=parent)
    try:
        blobs = os.path.join(staging, "blobs", "sha256")
        os.makedirs(blobs)
        tar_path = os.path.join(staging, "layer.tar")
        gz_path = os.path.join(staging, "layer.tar.gz")
        write_layer(args.rootfs, tar_path, mtime)
        diff_id = sha256_file(tar_path)
        gzip_file(tar_path, gz_path)
        os.remove(tar_path)
        layer_digest = sha256_file(gz_path)
        layer = {
            "mediaType": MEDIA_LAYER,
            "digest": f"sha256:{layer_digest}",
            "size": os.path.getsize(gz_path),
        }
        os.rename(gz_path, os.path.join(blobs, layer_digest))

        # What the Dockerfile's final stage says, in the image config's words.
        config = {
            "created": created,
            "architecture": arch,
            "os": "linux",
            "config": {
                "User": f"{NONROOT}:{NONROOT}",
                "Env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                ],
                "Entrypoint": ["/usr/local/bin/keyward"],
                "Cmd": ["serve"],
                "WorkingDir": "/data",
                "ExposedPorts": {"8080/tcp": {}, "8081/tcp": {}},
                "Labels": {
                    "org.opencontainers.image.title": "keyward",
                    "org.opencontainers.image.source": args.source,
                    "org.opencontainers.image.version": args.version,
                    "org.opencontainers.image.licenses": args.license,
                },
            },
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": created, "created_by": "scripts/image.sh"}],
        }
        config_desc = dict(mediaType=MEDIA_CONFIG, **put_blob(blobs, canonical(config)))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc,
            "layers": [layer],
        }
        manifest_desc = dict(mediaType=MEDIA_MANIFEST, **put_blob(blobs, canonical(manifest)))
        manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
        manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": args.tag}
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}
        with open(os.path.join(staging, "index.json"), "wb") as f:
            f.write(canonical(index))
        with open(os.path.join(staging, "oci-layout"), "wb") as f:
            f.write(canonical({"imageLayoutVersion": "1.0.0"}))

        if os.path.isdir(args.out):
            if os.listdir(args.out) and not os.path.exists(os.path.join(args.out, "oci-layout")):
                sys.exit(f"oci_image.py: {args.out} is not empty and not an OCI layout: not replacing it")
            shutil.rmtree(args.out)
        os.rename(staging, args.out)
        staging = None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{args.out}:{args.tag} {manifest_desc['digest']} (layer {layer['size']} bytes)")


if __name__ == "__main__":
    main()

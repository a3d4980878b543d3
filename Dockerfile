# syntax=docker/dockerfile:1
#
# keyward's container image, for hosts with Docker (BuildKit):
#
#   docker build -t ghcr.io/keyward-dev/keyward:0.1.0 --build-arg VERSION=0.1.0 .
#
# scripts/image.sh builds the same final stage without a Docker daemon (an OCI image
# layout from the host's release binary); README "Container image" says how to run it.

# ---- build: the release binary, stripped ----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the target directory between builds on one host;
# the binary is copied out of the cached target directory, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keyward \
 && install -D -m 0755 target/release/keyward /out/usr/local/bin/keyward \
 && strip /out/usr/local/bin/keyward \
 && mkdir -p /out/data

# ---- final: distroless, non-root, no shell ----
# distroless/cc rather than debian-slim: it holds exactly what the dynamically linked
# binary needs (glibc, libgcc_s, CA certificates, a `nonroot` user 65532) and no shell
# or package manager. Nothing in the image needs a shell: Kubernetes probes run
# `keyward probe /healthz` (see helm/keyward).
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="keyward" \
      org.opencontainers.image.description="Rate-limiting and key-pool sidecar for LLM API gateways" \
      org.opencontainers.image.source="https://github.com/keyward-dev/keyward" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/usr/local/bin/keyward /usr/local/bin/keyward
# The embedded shape's SQLite file and its key file are written to the working
# directory: /data is the only place uid 65532 may write, so the root filesystem can be
# mounted read-only with a volume (or an emptyDir) on /data.
COPY --from=build --chown=65532:65532 /out/data /data
WORKDIR /data
USER 65532:65532
# Both listeners stay on the loopback (the binary's default), as everywhere else: the
# data plane hands out provider keys to whoever holds a client key, so it is opened
# deliberately, e.g. `-e KEYWARD_LISTEN=0.0.0.0:8080` together with a
# KEYWARD_DATA_TOKEN (README "Who may call what"); the Helm chart sets the addresses.
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["serve"]

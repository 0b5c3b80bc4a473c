# The control plane image: grad (server) and gractl (CLI), from the
# repository root:
#   DOCKER_BUILDKIT=1 docker build -f runner-image/grad.Dockerfile -t grad:dev .
#
# Targets:
#   runtime (default, last)  debian slim, non-root, the release binaries
#   dev                      the toolchain + cargo-watch, running grad from /src;
#                            skaffold's `development` profile syncs changed
#                            sources into /src and cargo-watch rebuilds and
#                            restarts grad in the pod (hot reload)
#
# Build arguments: RUST_IMAGE and CARGO_PROFILE as in runner-image/Dockerfile
# (the locked dependencies need rustc >= 1.94.1).

ARG RUST_IMAGE=rust:1-slim-bookworm

# ---------------------------------------------------------------------------
# build: grad and gractl (protox compiles the protos: no protoc; the C parts --
# ring, aws-lc-sys, mimalloc, bundled SQLite -- need only the image's gcc).
FROM ${RUST_IMAGE} AS build
ARG CARGO_PROFILE=release
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    set -eux; \
    cargo build --locked --profile "${CARGO_PROFILE}" -p grad -p gractl; \
    case "${CARGO_PROFILE}" in dev) dir=debug ;; *) dir="${CARGO_PROFILE}" ;; esac; \
    mkdir -p /out; \
    cp "target/${dir}/grad" "target/${dir}/gractl" /out/

# ---------------------------------------------------------------------------
# dev: hot reload for `skaffold dev -p development`. The sources and a warm
# target/ are baked into the image (no cache mounts here: they would not be in
# the image), so cargo-watch's first build in the pod is incremental; after
# that skaffold copies each changed *.rs / Cargo.toml / proto file into /src
# and cargo-watch rebuilds and restarts `grad serve`. Runs as uid 1000 like the
# release image; /src and the cargo home are writable by it.
FROM ${RUST_IMAGE} AS dev
ARG CARGO_WATCH_VERSION=8.5.3
RUN set -eux; \
    CARGO_HOME=/tmp/cargo-install cargo install --locked --root /usr/local \
        cargo-watch --version "${CARGO_WATCH_VERSION}"; \
    rm -rf /tmp/cargo-install; \
    groupadd --gid 1000 grad; \
    useradd --uid 1000 --gid 1000 --home-dir /home/grad --create-home grad; \
    mkdir -p /src /var/lib/grad; \
    chown grad:grad /src /var/lib/grad; \
    chmod a+rwx /usr/local/cargo
WORKDIR /src
COPY --chown=1000:1000 . .
USER 1000:1000
RUN cargo build --locked -p grad -p gractl
EXPOSE 7070
# -w: the crates grad is built from; a change elsewhere (runner/, gractl/,
# tests/) does not restart the server.
ENTRYPOINT ["cargo", "watch", "-w", "grad", "-w", "proto", "-w", "transfer", "-w", "bundle", "-w", "Cargo.toml", "-w", "Cargo.lock", "-x", "run --locked -p grad -- serve --listen 0.0.0.0:7070 --data-dir /var/lib/grad"]

# ---------------------------------------------------------------------------
# runtime
FROM debian:bookworm-slim AS runtime
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --gid 1000 grad; \
    useradd --uid 1000 --gid 1000 --home-dir /home/grad --create-home --shell /usr/sbin/nologin grad; \
    mkdir -p /var/lib/grad; \
    chown grad:grad /var/lib/grad; \
    chmod 0700 /var/lib/grad
COPY --from=build /out/grad /out/gractl /usr/local/bin/
# The data dir holds jwt.key, blob.key, secrets.key, admin.token and the
# embedded blob store; in Kubernetes it is the PVC grad-data.
USER 1000:1000
WORKDIR /var/lib/grad
EXPOSE 7070
ENTRYPOINT ["grad"]
CMD ["serve", "--listen", "0.0.0.0:7070", "--data-dir", "/var/lib/grad"]

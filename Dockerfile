# syntax=docker/dockerfile:1
#
# fieldkey container image: a release build in the official Rust image, then only the
# binary, the default configuration and the example policies on distroless (glibc,
# libgcc, CA certificates; no shell, no package manager), running as uid/gid 65532.
#
#   docker build --platform linux/amd64 -t registry.example.org/fieldkey:0.1.0 .
#
# NOT BUILT IN CI: no Docker engine runs there. scripts/validate-k8s.sh lints this file
# (checkov, dockerfile framework); keep it conventional.
#
# x86-64 only: .cargo/config.toml compiles AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 in for
# x86_64-unknown-linux-gnu (fieldkey checks for them at start and refuses to run on a
# CPU without them), so the image is built for linux/amd64. An arm64 image would need
# that file's equivalent for aarch64 first (BENCHMARKS.md explains the choice).
#
# Pin the two base images by digest in your build (FROM image:tag@sha256:...): they are
# given by tag here because this repository cannot look digests up.

ARG RUST_VERSION=1.95

FROM --platform=linux/amd64 rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# What `cargo build` reads: the manifest and lock file, the target features, the build
# script and its protos, the sources, and the bench targets the manifest declares.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo/ .cargo/
COPY proto/ proto/
COPY benches/ benches/
COPY src/ src/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fieldkey \
    && install -D -m 0755 target/release/fieldkey /out/usr/local/bin/fieldkey \
    && install -d -m 0700 -o 65532 -g 65532 /out/var/lib/fieldkey
COPY deploy/docker/fieldkey.toml /out/etc/fieldkey/fieldkey.toml
COPY policies/ /out/etc/fieldkey/policies/

# gcr.io/distroless/cc-debian12 provides glibc and libgcc_s, which the binary links to.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="fieldkey" \
      org.opencontainers.image.description="Field-level encryption and key-management sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/usr/local/bin/fieldkey /usr/local/bin/fieldkey
COPY --from=build /out/etc/fieldkey/ /etc/fieldkey/
COPY --from=build --chown=65532:65532 /out/var/lib/fieldkey/ /var/lib/fieldkey/
USER 65532:65532
WORKDIR /var/lib/fieldkey
# glibc's allocator: large blocks (request messages) from mmap, so they go back to the
# OS when freed, and two arenas instead of one per core. Measured (BENCHMARKS.md, issue
# 20): a burst peaking at 175 MiB left 159 MiB resident with the defaults, 113 MiB
# with these; mimalloc peaked at 1.1 GiB on the same burst.
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=1048576:glibc.malloc.arena_max=2
# 7450 gRPC (plaintext; loopback in the default configuration), 7451 gRPC over mTLS
# ([listen.mtls], when configured), 9464 metrics and health (HTTP).
EXPOSE 7450 7451 9464
# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: the image has no shell or HTTP client to run one, and its orchestrator (Kubernetes) probes /healthz and /readyz on port 9464 itself (deploy/k8s); Docker's HEALTHCHECK is ignored there.
ENTRYPOINT ["/usr/local/bin/fieldkey"]
CMD ["serve", "--config", "/etc/fieldkey/fieldkey.toml"]

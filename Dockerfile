# syntax=docker/dockerfile:1
# The matrix-k8s-toggle image: the release binary on distroless (no shell), run as 65532 (nonroot).
#   docker build -t matrix-k8s-toggle:0.1.0 .
# Cargo reads every workspace member and every declared target before it builds one: so the
# bench sources and the test-apiserver/ member are copied, though neither is built.
# tests/manifests.rs checks that this list and .dockerignore are enough.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY test-apiserver ./test-apiserver
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p matrix-k8s-toggle \
 && install -D -m 0755 target/release/matrix-k8s-toggle /out/matrix-k8s-toggle \
 && install -d -m 0700 /out/data

# NB: the cc variant carries glibc and libgcc_s, which the binary links; the builder is bookworm too,
# so both use the same glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="matrix-k8s-toggle" \
      org.opencontainers.image.description="A Matrix application service that switches Kubernetes workloads on and off from chat" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/matrix-k8s-toggle /usr/local/bin/matrix-k8s-toggle
# An empty /data owned by the runtime user, so a fresh named volume inherits that owner.
COPY --from=builder --chown=65532:65532 /out/data /data
ENV STATE_DIR=/data
VOLUME /data
USER 65532:65532
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/matrix-k8s-toggle"]
CMD ["serve"]

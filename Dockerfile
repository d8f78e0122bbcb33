# syntax=docker/dockerfile:1
# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The workspace's other members and targets must exist for the manifest to load.
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY bench/src ./bench/src
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin buffergate

# Runtime: no shell, no package manager, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/buffergate /usr/local/bin/buffergate
# 65532 is distroless's "nonroot" user, numeric so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENV BUFFERGATE_LISTEN=0.0.0.0:8080 BUFFERGATE_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/buffergate"]
CMD ["serve"]

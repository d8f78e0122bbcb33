# syntax=docker/dockerfile:1
# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
# librdkafka (the Kafka front) is built from the rdkafka crate's bundled source with cmake and
# linked against the system OpenSSL; its 2.12 sources include <curl/curl.h> even without curl
# (only the header is used, libcurl is not linked).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libcurl4-openssl-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The workspace's other members and targets must exist for the manifest to load.
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY bench/src ./bench/src
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin buffergate && mkdir -p /journal

# Runtime: no shell, no package manager, non-root; "base" rather than "cc" for libssl3, which the
# Kafka client's TLS links against.
FROM gcr.io/distroless/base-debian12:nonroot
COPY --from=build /src/target/release/buffergate /usr/local/bin/buffergate
# The journal's directory, owned by the user the gateway runs as.
COPY --from=build --chown=65532:65532 /journal /var/lib/buffergate
# 65532 is distroless's "nonroot" user, numeric so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENV BUFFERGATE_LISTEN=0.0.0.0:8080 BUFFERGATE_LOG_FORMAT=json BUFFERGATE_DATA_DIR=/var/lib/buffergate
# The journal; mount a persistent volume here (a StatefulSet's volume claim in Kubernetes).
VOLUME ["/var/lib/buffergate"]
ENTRYPOINT ["/usr/local/bin/buffergate"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# The xsender-events image: a release build on the official Rust image, run as a non-root user
# on Debian slim (same Debian release as the builder, so the glibc matches).
#   docker build -t xsender-events:0.1.0 .
#   docker run -p 8080:8080 -v xsender-data:/data xsender-events:0.1.0

FROM rust:1.95-slim-trixie AS builder
# librdkafka and jemalloc are built from source by their -sys crates with configure + make; the
# slim image has gcc but not make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the binary is built from (see .dockerignore); tests and fixtures stay out.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
# Cache mounts keep the crate downloads and build output across builds; the binary is copied
# out of the cached target folder because cache mounts are not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin xsender-events \
    && cp target/release/xsender-events /usr/local/bin/xsender-events

FROM debian:trixie-slim
# ca-certificates: the SES adapter fetches SNS signing certificates over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 xsender \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin xsender \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /usr/local/bin/xsender-events /usr/local/bin/xsender-events
USER 10001:10001
WORKDIR /data
EXPOSE 8080
VOLUME ["/data"]
ENTRYPOINT ["/usr/local/bin/xsender-events"]
CMD ["serve", "--data-dir", "/data"]

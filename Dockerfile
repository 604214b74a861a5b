# ratelimitd container image: a release build on Debian, then only the binary and the example
# rules on distroless (glibc, no shell, no package manager), running as the nonroot user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY examples examples
RUN cargo build --release --locked --bin ratelimitd && strip target/release/ratelimitd

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ratelimitd /usr/local/bin/ratelimitd
COPY config /srv/runtime_data/current/config
USER nonroot:nonroot
EXPOSE 8080 8081 6070
ENTRYPOINT ["/usr/local/bin/ratelimitd"]
CMD ["serve"]

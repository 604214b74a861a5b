# ratelimitd container image: a release build on Debian, then only the binary and the example
# rules on distroless (glibc, no shell, no package manager), running as the nonroot user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY examples examples
RUN cargo build --release --locked --bin ratelimitd && strip target/release/ratelimitd
# The reference image's command is /bin/ratelimit (Envoy Gateway starts the container with
# exactly that, no arguments; with none ratelimitd serves): a link to the one binary, made here
# because the final stage has no shell. COPY keeps links inside a copied directory.
RUN mkdir -p /out/bin && ln -s /usr/local/bin/ratelimitd /out/bin/ratelimit

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ratelimitd /usr/local/bin/ratelimitd
COPY --from=build /out/bin/ /bin/
COPY config /srv/runtime_data/current/config
USER nonroot:nonroot
EXPOSE 8080 8081 6070
ENTRYPOINT ["/usr/local/bin/ratelimitd"]
CMD ["serve"]

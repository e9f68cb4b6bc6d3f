# authgate container image: a static binary on distroless, run as non-root.
#   docker build -t authgate .
#   docker run -p 8443:8443 -v ./certs:/certs -v ./config:/config -v authgate-state:/state \
#     -e AUTHGATE_PUBLIC_URL=https://localhost:8443 \
#     -e AUTHGATE_UPSTREAM=http://console:21114 \
#     -e AUTHGATE_OIDC_ISSUER=https://login.microsoftonline.com/TENANT_ID/v2.0 \
#     -e AUTHGATE_OIDC_CLIENT_ID=APPLICATION_ID \
#     -e AUTHGATE_OIDC_CLIENT_SECRET=SECRET_VALUE \
#     authgate
# scripts/build-image replays these steps without Docker (CI runs it): the
# build stage's COPY lines into an empty directory, and this run line.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest names a bench and an example under benches/: cargo reads
# them even to build the binary alone.
COPY benches ./benches
COPY scripts/build-static ./scripts/build-static
RUN scripts/build-static /out/usr/local/bin/authgate
# Mount points, owned by the runtime user (65532 = distroless "nonroot"),
# so a first run can write its self-signed certificate into /certs and
# its sessions (state_dir) into /state; a named volume starts as a copy.
COPY config/authgate.toml /out/config/authgate.toml
RUN mkdir -p /out/certs /out/state && chown -R 65532:65532 /out/certs /out/config /out/state

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/ /
# Relative defaults (config/authgate.toml, certs/tls.crt) resolve from /.
WORKDIR /
USER 65532:65532
VOLUME ["/certs", "/config", "/state"]
EXPOSE 8443
HEALTHCHECK --interval=30s --timeout=6s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/authgate", "health"]
ENTRYPOINT ["/usr/local/bin/authgate"]
CMD ["serve"]

//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no `protoc` is needed) and
//! generates the tonic servers and clients, plus a descriptor set for gRPC server reflection.
//!
//! The reflection descriptor set holds the RLS protocol only: reflection lists every service of
//! the set it is given, and the xDS ones (ADS client, rule resources) are not served.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rls = "proto/envoy/service/ratelimit/v3/rls.proto";
    let xds = [
        "proto/envoy/service/discovery/v3/ads.proto",
        "proto/ratelimit/config/ratelimit/v3/rls_conf.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let reflected = protox::compile([rls], ["proto"])?;
    let bytes = prost::Message::encode_to_vec(&reflected);
    std::fs::write(out.join("rls_descriptor.bin"), bytes)?;
    let all = protox::compile(std::iter::once(rls).chain(xds), ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(all)?;
    Ok(())
}

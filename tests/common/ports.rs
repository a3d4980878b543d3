//! Free TCP ports for child processes (redis-server, nginx, Envoy, keyward itself) that
//! bind them themselves. Shared by the tests and the benches (`benches/support/mod.rs`
//! includes this file by path), so it depends on nothing but `std` and `rand`.

/// A TCP port that was free a moment ago (for child processes that bind it themselves).
///
/// It is below the kernel's ephemeral range (and so is port + 10000, a cluster node's bus
/// port): a port from that range (`bind(:0)`) can be taken by any outgoing connection of
/// the tests running beside this one, between the moment it is picked and the moment the
/// child binds it, or while a server the test restarts on the same port is down.
pub fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > 20_001 {
        let span = ephemeral_low - 20_001;
        for _ in 0..1_000 {
            let port = (10_000 + rand::random::<u32>() % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port whose cluster bus port (port + 10000) is free too.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

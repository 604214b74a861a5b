//! `REDIS_TYPE` and the `REDIS_URL` forms it takes, as the reference reads them
//! (`src/redis/driver_impl.go`): `single` a `host:port`, socket path or URL; `sentinel`
//! `master-name,host:port,host:port,...` (the sentinels); `cluster` `host:port,host:port,...`
//! (any nodes: the rest of the cluster is discovered from them). Parsed once at start-up, so a
//! malformed URL stops ratelimitd with the entry at fault.

/// `REDIS_TYPE` / `REDIS_PERSECOND_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisType {
    /// One server (or a proxy such as twemproxy).
    #[default]
    Single,
    /// A master found through Redis Sentinel, followed across failovers.
    Sentinel,
    /// Redis Cluster.
    Cluster,
}

impl RedisType {
    /// The setting's value, any case (the reference lower-cases it).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "single" => Some(RedisType::Single),
            "sentinel" => Some(RedisType::Sentinel),
            "cluster" => Some(RedisType::Cluster),
            _ => None,
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            RedisType::Single => "single",
            RedisType::Sentinel => "sentinel",
            RedisType::Cluster => "cluster",
        }
    }
}

/// A `REDIS_URL` that does not fit its `REDIS_TYPE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("REDIS_TYPE=sentinel expects the master name and the sentinels, as <master name>,<host:port>,...,<host:port>; got '{0}'")]
    SentinelForm(String),
    #[error("REDIS_TYPE=cluster expects the nodes, as <host:port>,...,<host:port>; got '{0}'")]
    ClusterForm(String),
    #[error("REDIS_TYPE={kind}: '{entry}' is not host:port (in '{url}')")]
    Address {
        kind: &'static str,
        entry: String,
        url: String,
    },
}

/// `sentinel`'s URL: the master's name and the sentinels' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    pub master: String,
    pub sentinels: Vec<(String, u16)>,
}

/// Reads `master-name,host:port,...` (at least one sentinel).
pub fn sentinel_url(url: &str) -> Result<SentinelUrl, UrlError> {
    let mut parts = url.split(',').map(str::trim);
    let master = parts.next().unwrap_or_default();
    let sentinels = parts
        .map(|entry| address(entry, RedisType::Sentinel, url))
        .collect::<Result<Vec<_>, _>>()?;
    if master.is_empty() || master.contains(':') || sentinels.is_empty() {
        return Err(UrlError::SentinelForm(url.to_owned()));
    }
    Ok(SentinelUrl {
        master: master.to_owned(),
        sentinels,
    })
}

/// Reads `host:port,...` (at least one node).
pub fn cluster_nodes(url: &str) -> Result<Vec<(String, u16)>, UrlError> {
    if url.trim().is_empty() {
        return Err(UrlError::ClusterForm(url.to_owned()));
    }
    url.split(',')
        .map(|entry| address(entry.trim(), RedisType::Cluster, url))
        .collect()
}

/// `host:port` or `[v6]:port`, the port required (every node and sentinel has its own).
fn address(entry: &str, kind: RedisType, url: &str) -> Result<(String, u16), UrlError> {
    let bad = || UrlError::Address {
        kind: kind.name(),
        entry: entry.to_owned(),
        url: url.to_owned(),
    };
    let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || host.contains('/') || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// `password` or `user:password` (`REDIS_AUTH`, `REDIS_SENTINEL_AUTH`), as the reference
/// splits it; `None` when empty.
pub fn credentials(auth: &str) -> Option<(Option<&str>, &str)> {
    if auth.is_empty() {
        return None;
    }
    Some(match auth.split_once(':') {
        Some((user, pass)) => (Some(user), pass),
        None => (None, auth),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(h: &str, p: u16) -> (String, u16) {
        (h.to_owned(), p)
    }

    #[test]
    fn types_read_in_any_case() {
        assert_eq!(RedisType::parse("SINGLE"), Some(RedisType::Single));
        assert_eq!(RedisType::parse("Sentinel"), Some(RedisType::Sentinel));
        assert_eq!(RedisType::parse("cluster"), Some(RedisType::Cluster));
        assert_eq!(RedisType::parse("clustre"), None);
        assert_eq!(RedisType::parse(""), None);
    }

    #[test]
    fn sentinel_urls_name_the_master_then_the_sentinels() {
        assert_eq!(
            sentinel_url("mymaster,10.0.0.1:26379, sentinel-2:26380,[::1]:26381"),
            Ok(SentinelUrl {
                master: "mymaster".into(),
                sentinels: vec![
                    hp("10.0.0.1", 26379),
                    hp("sentinel-2", 26380),
                    hp("::1", 26381)
                ],
            })
        );
        for bad in [
            "mymaster",
            "mymaster,",
            ",10.0.0.1:26379",
            "10.0.0.1:26379,10.0.0.2:26379",
        ] {
            assert!(sentinel_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            sentinel_url("mymaster").unwrap_err().to_string(),
            "REDIS_TYPE=sentinel expects the master name and the sentinels, as <master name>,<host:port>,...,<host:port>; got 'mymaster'"
        );
        assert_eq!(
            sentinel_url("m,host").unwrap_err().to_string(),
            "REDIS_TYPE=sentinel: 'host' is not host:port (in 'm,host')"
        );
    }

    #[test]
    fn cluster_urls_list_nodes() {
        assert_eq!(
            cluster_nodes("127.0.0.1:7000,127.0.0.1:7001"),
            Ok(vec![hp("127.0.0.1", 7000), hp("127.0.0.1", 7001)])
        );
        assert_eq!(cluster_nodes("redis-0:6379"), Ok(vec![hp("redis-0", 6379)]));
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:7000,",
            "127.0.0.1:x",
            "redis://a:1",
            ":7000",
            "a:0",
        ] {
            assert!(cluster_nodes(bad).is_err(), "{bad}");
        }
        assert_eq!(
            cluster_nodes("a:1,b").unwrap_err().to_string(),
            "REDIS_TYPE=cluster: 'b' is not host:port (in 'a:1,b')"
        );
    }

    #[test]
    fn auth_is_password_or_user_and_password() {
        assert_eq!(credentials(""), None);
        assert_eq!(credentials("s3cret"), Some((None, "s3cret")));
        assert_eq!(
            credentials("alice:s3:cret"),
            Some((Some("alice"), "s3:cret"))
        );
    }
}

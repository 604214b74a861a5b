//! The reference's stat-name rules, shared by the config compiler (rule stats keys), the
//! matcher (keys with request values) and the metrics exporters: kept apart so `config` does
//! not depend on `metrics`.

/// The reference's stat-name sanitising: `:` and `|` become `_`, and the dots of IPv4
/// addresses become `_`, so an address is one path element.
pub fn sanitize(key: &str) -> String {
    let replaced: String = key
        .chars()
        .map(|c| if c == ':' || c == '|' { '_' } else { c })
        .collect();
    let bytes = replaced.as_bytes();
    let mut out = String::with_capacity(replaced.len());
    let mut i = 0;
    while i < replaced.len() {
        match ipv4_at(bytes, i) {
            Some(len) => {
                for c in replaced[i..i + len].chars() {
                    out.push(if c == '.' { '_' } else { c });
                }
                i += len;
            }
            None => {
                let c = replaced[i..].chars().next().unwrap_or('_');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// Length of the leftmost match of `\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}` starting at `at`.
fn ipv4_at(b: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    for group in 0..4 {
        let start = i;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        if group < 3 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    Some(i - at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_like_the_reference() {
        assert_eq!(
            sanitize("d.remote_address_10.0.0.1"),
            "d.remote_address_10_0_0_1"
        );
        assert_eq!(sanitize("d.k_a:b|c"), "d.k_a_b_c");
        assert_eq!(sanitize("d.version_1.2.3"), "d.version_1.2.3");
        assert_eq!(sanitize("d.ip_1234.5.6.7"), "d.ip_1234_5_6_7");
    }
}

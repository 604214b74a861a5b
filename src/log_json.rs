//! `LOG_FORMAT=json`: one JSON object per line with the keys the reference writes, so log
//! pipelines built for it keep parsing ours.
//!
//! The reference configures logrus' `JSONFormatter` with `TimestampFormat: time.RFC3339Nano`
//! and the field map time -> `@timestamp`, msg -> `@message`. A line is therefore
//! `{"@message":"…","@timestamp":"2026-11-29T15:52:07.123456789Z","level":"info",…}` with the
//! event's own fields at the top level. tracing-subscriber's JSON formatter cannot rename its
//! keys (`timestamp`, `fields.message`) nor write logrus' level names, hence this small
//! [`FormatEvent`]; serde_json does all the escaping.
//!
//! As logrus does, an event field whose name is one of the three keys is written as
//! `fields.<name>` rather than overwrite it. Keys come out sorted, as Go's `encoding/json`
//! writes a map. Times are UTC (the reference's are the host's local time, UTC in its image).

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value};
use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{
    field::Visit,
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
};

/// The message key.
const MESSAGE: &str = "@message";
/// The time key.
const TIMESTAMP: &str = "@timestamp";
/// The level key.
const LEVEL: &str = "level";

/// Formats each event as a logrus JSON line (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogrusJson;

impl<S, N> FormatEvent<S, N> for LogrusJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let line = line(event, SystemTime::now());
        writeln!(writer, "{line}")
    }
}

/// The JSON object of one event at `now`.
fn line(event: &Event<'_>, now: SystemTime) -> String {
    // A BTreeMap-backed map (serde_json without `preserve_order`): sorted keys, as Go's.
    let mut fields = Map::new();
    event.record(&mut Fields(&mut fields));
    fields.insert(TIMESTAMP.to_owned(), Value::String(rfc3339_nano(now)));
    fields.insert(
        LEVEL.to_owned(),
        Value::String(level_name(event.metadata().level()).to_owned()),
    );
    fields
        .entry(MESSAGE)
        .or_insert(Value::String(String::new()));
    Value::Object(fields).to_string()
}

/// logrus' name of a level (`Level.String()`): tracing's WARN is logrus' `warning`.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warning",
        Level::ERROR => "error",
    }
}

/// Collects an event's fields: `message` becomes `@message`, numbers and booleans stay JSON
/// numbers and booleans, everything else is its `Display` (errors) or `Debug` text.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let key = match field.name() {
            "message" => MESSAGE.to_owned(),
            // logrus' prefixFieldClashes: a field never overwrites one of the line's own keys.
            name @ (MESSAGE | TIMESTAMP | LEVEL) => format!("fields.{name}"),
            name => name.to_owned(),
        };
        self.0.insert(key, value);
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // NaN and infinities have no JSON number; serde_json would write null.
        let value = serde_json::Number::from_f64(value)
            .map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// Go's `time.RFC3339Nano` in UTC: `2006-01-02T15:04:05.999999999Z`, i.e. nanoseconds with
/// trailing zeros dropped, and no fraction at all on a whole second.
fn rfc3339_nano(t: SystemTime) -> String {
    // Before 1970 only on a broken clock; written as the epoch rather than failing a log line.
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    );
    let nanos = since.subsec_nanos();
    if nanos != 0 {
        let fraction = format!(".{nanos:09}");
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// The proleptic Gregorian date of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;

    fn at(secs: u64, nanos: u32) -> String {
        rfc3339_nano(UNIX_EPOCH + Duration::new(secs, nanos))
    }

    #[test]
    fn timestamps_are_go_rfc3339_nano() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(
            at(1_795_967_527, 123_456_789),
            "2026-11-29T15:52:07.123456789Z"
        );
        assert_eq!(at(1_795_967_527, 120_000_000), "2026-11-29T15:52:07.12Z");
        assert_eq!(at(1_795_967_527, 1), "2026-11-29T15:52:07.000000001Z");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28T23:59:59Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn level_names_are_logrus_names() {
        let names: Vec<_> = [Level::DEBUG, Level::INFO, Level::WARN, Level::ERROR]
            .iter()
            .map(level_name)
            .collect();
        assert_eq!(names, ["debug", "info", "warning", "error"]);
    }

    /// A writer the subscriber below logs into.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("no panic while held")
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines `log` writes through a subscriber formatting with [`LogrusJson`].
    fn logged(log: impl FnOnce()) -> Vec<Value> {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_writer(move || writer.clone())
            .event_format(LogrusJson)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(out.0.lock().expect("no panic while held").clone())
            .expect("serde_json writes UTF-8");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    }

    #[test]
    fn an_event_is_one_line_with_the_reference_keys_and_its_fields_at_the_top() {
        let error = std::io::Error::other("boom \"quoted\"\n");
        let lines = logged(|| {
            tracing::warn!(addr = "127.0.0.1:8081", n = 3_u64, ok = true, ratio = 0.5,
                error = %error, "a \"quoted\" message");
        });
        assert_eq!(lines.len(), 1);
        let line = lines[0].as_object().unwrap();
        let keys: Vec<&str> = line.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "@message",
                "@timestamp",
                "addr",
                "error",
                "level",
                "n",
                "ok",
                "ratio"
            ]
        );
        assert_eq!(line["@message"], "a \"quoted\" message");
        assert_eq!(line["level"], "warning");
        assert_eq!(line["addr"], "127.0.0.1:8081");
        assert_eq!(line["error"], "boom \"quoted\"\n");
        assert_eq!(line["n"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["ratio"], 0.5);
        let ts = line["@timestamp"].as_str().unwrap();
        assert!(
            ts.len() >= 20 && ts.ends_with('Z') && &ts[10..11] == "T",
            "{ts}"
        );
    }

    #[test]
    fn a_field_named_like_a_key_is_prefixed_as_logrus_does() {
        let lines = logged(|| tracing::debug!(level = "x", "m"));
        assert_eq!(lines[0]["level"], "debug");
        assert_eq!(lines[0]["fields.level"], "x");
        assert_eq!(lines[0]["@message"], "m");
    }
}

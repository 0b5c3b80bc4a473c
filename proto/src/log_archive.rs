//! The format of an attempt's archived log, which workers upload and
//! clients read back: NDJSON, one object per log line,
//! `{"seq":N,"time_ms":N,"stream":"stdout"|"stderr","text":"..."}`.

use serde::{Deserialize, Serialize};

use crate::v1::{LogLine, LogStream};

#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    time_ms: i64,
    stream: String,
    text: String,
}

/// One line of the archive, newline included.
pub fn encode(line: &LogLine) -> String {
    let time_ms = line
        .time
        .as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or_default();
    let entry = Entry {
        seq: line.seq,
        time_ms,
        stream: match line.stream() {
            LogStream::Stderr => "stderr",
            LogStream::Stdout | LogStream::Unspecified => "stdout",
        }
        .to_owned(),
        text: line.text.clone(),
    };
    // Cannot fail: the entry is plain strings and numbers.
    let mut text = serde_json::to_string(&entry).unwrap_or_default();
    text.push('\n');
    text
}

/// A line of the archive back as a log line.
pub fn decode(text: &str) -> Result<LogLine, String> {
    let entry: Entry = serde_json::from_str(text).map_err(|e| format!("a log line: {e}"))?;
    let stream = match entry.stream.as_str() {
        "stdout" => LogStream::Stdout,
        "stderr" => LogStream::Stderr,
        other => return Err(format!("a log line: unknown stream '{other}'")),
    };
    Ok(LogLine {
        seq: entry.seq,
        time: Some(prost_types::Timestamp {
            seconds: entry.time_ms.div_euclid(1000),
            nanos: (entry.time_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        stream: stream as i32,
        text: entry.text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_through_the_archive() {
        let line = LogLine {
            seq: (2 << 32) | 7,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_000_000,
            }),
            stream: LogStream::Stderr as i32,
            text: "tab\there \"quoted\" ünïcode".into(),
        };
        let text = encode(&line);
        assert!(text.ends_with('\n') && !text.trim_end().contains('\n'));
        assert_eq!(decode(text.trim_end()), Ok(line));
        assert!(decode("{\"seq\":1}").is_err());
    }
}

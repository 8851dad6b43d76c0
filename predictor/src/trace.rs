//! The trace format: JSON lines, one header line then one [`Sample`] per window.
//!
//! ```text
//! {"format":"prescient-trace","version":1,"name":"bursty-1","window_ms":100,"capacity":{"cpu":4.0,"mem":4096.0,"blk":200.0,"net":400.0}}
//! {"t_ms":0,"cpu":0.41,"mem":812.0,"blk":3.2,"net":0.9,"io_ops":120,"unknown_exits":0,"devices":3}
//! {"t_ms":100,"cpu":0.44,"mem":815.5,"blk":2.7,"net":1.1}
//! ```
//!
//! Units are those of [`crate::resource::Resource`]; `capacity` is what the VM was
//! configured with (the static allocation and the budget maximum). The rule signals
//! (`io_ops`, `unknown_exits`, `devices`), the leading indicators (`faults`, `exits`) and
//! `cpu_throttled`, `cpu_saturated` are optional. `t_ms` must increase.

use crate::resource::Usage;
use crate::sample::Sample;
use crate::spec::PolicySpec;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const FORMAT: &str = "prescient-trace";
pub const VERSION: u32 = 1;
/// File extension the directory readers pick up.
pub const EXTENSION: &str = "jsonl";

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Anything wrong inside a file, with the file's name.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<TraceError>,
    },
    #[error("line {line}, column {column}: {reason}")]
    Json {
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("line {line}: cannot read: {source}")]
    Read {
        line: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("line 1: empty file, no header")]
    Empty,
    #[error(
        "line 1: header says format {format:?} version {version}; expected {FORMAT:?} version {VERSION}"
    )]
    Format { format: String, version: u32 },
    #[error("line {line}: t_ms {t_ms} does not follow {previous}")]
    Order {
        line: usize,
        t_ms: u64,
        previous: u64,
    },
    #[error("writing trace: {0}")]
    Write(#[source] std::io::Error),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub window_ms: u64,
    pub capacity: Usage,
    /// The policy that ran live, for traces the VMM records: a replay rebuilds it and makes
    /// the same decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    /// Where the trace came from (e.g. the command `prescient trace record` ran and the host
    /// load), for people reading the corpus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Header {
    pub fn new(name: impl Into<String>, window_ms: u64, capacity: Usage) -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            name: name.into(),
            window_ms,
            capacity,
            policy: None,
            source: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub header: Header,
    pub samples: Vec<Sample>,
}

/// Streams samples to any writer; the VMM keeps one open for a recorded run.
pub struct TraceWriter<W: Write> {
    out: W,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(mut out: W, header: &Header) -> Result<Self, TraceError> {
        write_line(&mut out, header)?;
        Ok(TraceWriter { out })
    }

    pub fn write(&mut self, sample: &Sample) -> Result<(), TraceError> {
        write_line(&mut self.out, sample)
    }

    pub fn finish(mut self) -> Result<W, TraceError> {
        self.out.flush().map_err(TraceError::Write)?;
        Ok(self.out)
    }
}

/// serde_json's message for line `line` of the file, without its own position in the line
/// (which it counts from the line's start, as line 1).
fn json_error(line: usize, e: serde_json::Error) -> TraceError {
    let text = e.to_string();
    let reason = match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    TraceError::Json {
        line,
        column: e.column(),
        reason,
    }
}

fn write_line<T: Serialize>(out: &mut impl Write, value: &T) -> Result<(), TraceError> {
    serde_json::to_writer(&mut *out, value).map_err(|e| TraceError::Write(e.into()))?;
    out.write_all(b"\n").map_err(TraceError::Write)
}

/// Streams samples from any reader, checking the header and time order.
pub struct TraceReader<R: BufRead> {
    lines: std::io::Lines<R>,
    header: Header,
    line: usize,
    previous: Option<u64>,
}

impl<R: BufRead> TraceReader<R> {
    pub fn new(input: R) -> Result<Self, TraceError> {
        let mut lines = input.lines();
        let first = lines
            .next()
            .ok_or(TraceError::Empty)?
            .map_err(|source| TraceError::Read { line: 1, source })?;
        let header: Header = serde_json::from_str(&first).map_err(|e| json_error(1, e))?;
        if header.format != FORMAT || header.version != VERSION {
            return Err(TraceError::Format {
                format: header.format,
                version: header.version,
            });
        }
        Ok(TraceReader {
            lines,
            header,
            line: 1,
            previous: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<Sample, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line += 1;
            let text = match self.lines.next()? {
                Ok(t) => t,
                Err(source) => {
                    return Some(Err(TraceError::Read {
                        line: self.line,
                        source,
                    }))
                }
            };
            if text.trim().is_empty() {
                continue;
            }
            let line = self.line;
            let sample: Sample = match serde_json::from_str(&text) {
                Ok(s) => s,
                Err(e) => return Some(Err(json_error(line, e))),
            };
            if let Some(previous) = self.previous.filter(|&p| sample.t_ms <= p) {
                return Some(Err(TraceError::Order {
                    line,
                    t_ms: sample.t_ms,
                    previous,
                }));
            }
            self.previous = Some(sample.t_ms);
            return Some(Ok(sample));
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TraceError + '_ {
    move |source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a whole trace file; any error names the file (and the line, where there is one).
pub fn read(path: &Path) -> Result<Trace, TraceError> {
    let file = File::open(path).map_err(io_error(path))?;
    let in_file = |source| TraceError::InFile {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let reader = TraceReader::new(BufReader::new(file)).map_err(in_file)?;
    let header = reader.header().clone();
    let samples = reader.collect::<Result<Vec<_>, _>>().map_err(in_file)?;
    Ok(Trace { header, samples })
}

pub fn write(path: &Path, trace: &Trace) -> Result<(), TraceError> {
    let file = File::create(path).map_err(io_error(path))?;
    let mut w = TraceWriter::new(BufWriter::new(file), &trace.header)?;
    for s in &trace.samples {
        w.write(s)?;
    }
    w.finish()?;
    Ok(())
}

/// Every `*.jsonl` file in `dir`, sorted by name so runs are reproducible.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, TraceError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == EXTENSION))
        .collect();
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Signals;

    fn header() -> Header {
        Header::new(
            "t",
            100,
            Usage {
                cpu: 2.0,
                mem: 1024.0,
                blk: 50.0,
                net: 50.0,
            },
        )
    }

    fn sample(t_ms: u64) -> Sample {
        Sample {
            t_ms,
            usage: Usage {
                cpu: 0.5,
                mem: 300.0 + t_ms as f64,
                blk: 1.0,
                net: 2.0,
            },
            signals: Signals {
                io_ops: 3,
                devices: 1,
                faults: 40,
                ..Signals::default()
            },
        }
    }

    #[test]
    fn writer_output_reads_back() {
        let mut w = TraceWriter::new(Vec::new(), &header()).unwrap();
        for t in [0, 100, 200] {
            w.write(&sample(t)).unwrap();
        }
        let bytes = w.finish().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(
            text.starts_with(r#"{"format":"prescient-trace","version":1"#),
            "{text}"
        );
        let r = TraceReader::new(bytes.as_slice()).unwrap();
        assert_eq!(r.header(), &header());
        let samples: Vec<Sample> = r.map(Result::unwrap).collect();
        assert_eq!(samples, vec![sample(0), sample(100), sample(200)]);
    }

    #[test]
    fn documented_example_parses() {
        let text = r#"{"format":"prescient-trace","version":1,"name":"bursty-1","window_ms":100,"capacity":{"cpu":4.0,"mem":4096.0,"blk":200.0,"net":400.0}}
{"t_ms":0,"cpu":0.41,"mem":812.0,"blk":3.2,"net":0.9,"io_ops":120,"unknown_exits":0,"devices":3}

{"t_ms":100,"cpu":0.44,"mem":815.5,"blk":2.7,"net":1.1}
"#;
        let r = TraceReader::new(text.as_bytes()).unwrap();
        let s: Vec<Sample> = r.map(Result::unwrap).collect();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].signals.devices, 3);
        assert_eq!(s[1].signals.io_ops, 0);
    }

    #[test]
    fn rejects_bad_input_with_line_numbers() {
        assert!(matches!(TraceReader::new(&b""[..]), Err(TraceError::Empty)));
        let other = r#"{"format":"other","version":1,"name":"x","window_ms":1,"capacity":{"cpu":1,"mem":1,"blk":1,"net":1}}"#;
        assert!(matches!(
            TraceReader::new(other.as_bytes()),
            Err(TraceError::Format { .. })
        ));
        let mut text = serde_json::to_string(&header()).unwrap();
        text.push_str("\n{\"t_ms\":100,\"cpu\":1,\"mem\":1,\"blk\":1,\"net\":1}\n{\"t_ms\":100,\"cpu\":1,\"mem\":1,\"blk\":1,\"net\":1}\n{\"t_ms\":300}\n");
        let results: Vec<_> = TraceReader::new(text.as_bytes()).unwrap().collect();
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(TraceError::Order {
                line: 3,
                t_ms: 100,
                previous: 100
            })
        ));
        assert!(matches!(results[2], Err(TraceError::Json { line: 4, .. })));
    }

    #[test]
    fn a_broken_file_is_an_error_naming_file_and_line() {
        let dir = std::env::temp_dir().join(format!("predictor-broken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = Trace {
            header: header(),
            samples: vec![sample(0), sample(100), sample(200)],
        };
        let path = dir.join("t.jsonl");
        write(&path, &good).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let message = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read(&path).unwrap_err().to_string()
        };
        // Cut in the middle of the last sample, as a crash mid-write leaves it.
        let cut = message(&bytes[..bytes.len() - 20]);
        assert!(
            cut.contains("t.jsonl") && cut.contains("line 4") && cut.contains("EOF"),
            "{cut}"
        );
        // Every possible truncation is an error or a shorter trace, never a panic.
        for end in 0..bytes.len() {
            std::fs::write(&path, &bytes[..end]).unwrap();
            if let Ok(t) = read(&path) {
                assert!(t.samples.len() <= 3);
            }
        }
        assert!(message(b"").contains("line 1: empty file"));
        let binary = message(&[0xff, 0xfe, 0x00, 0x80, b'\n']);
        assert!(binary.contains("t.jsonl: line 1"), "{binary}");
        let mut mixed = bytes.clone();
        mixed.extend_from_slice(b"{\"t_ms\":300,\"cpu\":\"lots\"}\n");
        let bad = message(&mixed);
        assert!(
            bad.ends_with("line 5, column 25: invalid type: string \"lots\", expected f64"),
            "{bad}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_round_trip_and_list_sorted() {
        let dir = std::env::temp_dir().join(format!("predictor-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Trace {
            header: header(),
            samples: vec![sample(0), sample(100)],
        };
        write(&dir.join("b.jsonl"), &t).unwrap();
        write(&dir.join("a.jsonl"), &t).unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let paths = list(&dir).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.jsonl", "b.jsonl"]);
        assert_eq!(read(&paths[0]).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The JSON Lines sink: one line per accepted message, appended, fsync'd per batch.
//!
//! The sink is the ingest's log of record. The replay windows are a checkpoint that
//! names the sink offset they cover; on start, [`JsonlSink::open`] cuts a torn last
//! line (a crash mid-write; that message was never acknowledged to the broker, so it
//! comes again) and returns the lines after the checkpoint so the windows can catch up.
//! Hence a message is in the sink exactly once even across crashes.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One accepted message, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkLine {
    /// Gateway that carried it.
    pub gateway: String,
    /// Device that sealed it.
    pub device: String,
    /// Key that sealed it.
    pub key_id: u32,
    /// The device's sequence number.
    pub seq: u64,
    /// When the ingest received it (ms since the Unix epoch).
    pub received_ms: u64,
    /// The plaintext as JSON, when it is a JSON reading (compressed or not).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub json: Option<serde_json::Value>,
    /// The plaintext in base64, when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base64: Option<String>,
    /// For an image chunk: image id, chunk index and count.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub image_chunk: Option<(u64, u32, u32)>,
}

/// Why the sink failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Reading, writing or syncing the file failed.
    #[error("JSON Lines sink {path} failed")]
    Io {
        /// The sink file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An append-only JSON Lines file.
pub struct JsonlSink {
    path: PathBuf,
    file: File,
    /// Bytes in the file that are complete lines.
    len: u64,
    buffer: Vec<u8>,
}

impl JsonlSink {
    /// Opens (or creates) the sink, cuts a torn last line, and returns the lines that
    /// start at or after `checkpoint` (the offset the replay state covers).
    ///
    /// # Errors
    /// [`SinkError::Io`].
    pub fn open(path: &Path, checkpoint: u64) -> Result<(Self, Vec<SinkLine>), SinkError> {
        let io = |source| SinkError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let complete = complete_length(&mut file).map_err(io)?;
        if complete < file.metadata().map_err(io)?.len() {
            file.set_len(complete).map_err(io)?;
            file.sync_all().map_err(io)?;
            tracing::warn!(path = %path.display(), "cut a torn last line from the sink (a crash mid-write; the message will be delivered again)");
        }
        let mut tail = Vec::new();
        let start = checkpoint.min(complete);
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        for line in BufReader::new(&file).lines() {
            let line = line.map_err(io)?;
            match serde_json::from_str::<SinkLine>(&line) {
                Ok(parsed) => tail.push(parsed),
                Err(_) => tracing::error!("unreadable line in the sink tail; skipped"),
            }
        }
        let sink = Self {
            path: path.to_owned(),
            file,
            len: complete,
            buffer: Vec::new(),
        };
        Ok((sink, tail))
    }

    /// Adds a line to the current batch (not yet written).
    pub fn push(&mut self, line: &SinkLine) {
        if serde_json::to_writer(&mut self.buffer, line).is_ok() {
            self.buffer.push(b'\n');
        }
    }

    /// Writes the batch and fsyncs; returns the new length, the offset a checkpoint
    /// taken now covers.
    ///
    /// # Errors
    /// [`SinkError::Io`]; then the batch is not durable and must not be acknowledged.
    pub fn commit(&mut self) -> Result<u64, SinkError> {
        if !self.buffer.is_empty() {
            let io = |source| SinkError::Io {
                path: self.path.clone(),
                source,
            };
            self.file.write_all(&self.buffer).map_err(io)?;
            self.file.sync_data().map_err(io)?;
            self.len += self.buffer.len() as u64;
            self.buffer.clear();
        }
        Ok(self.len)
    }

    /// Length of the durable part.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True while nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Length of the file up to and including its last newline.
fn complete_length(file: &mut File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut at = len;
    let mut chunk = [0u8; 4096];
    while at > 0 {
        let step = at.min(chunk.len() as u64);
        at -= step;
        file.seek(SeekFrom::Start(at))?;
        let part = &mut chunk[..usize::try_from(step).unwrap_or(0)];
        io::Read::read_exact(file, part)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            return Ok(at + i as u64 + 1);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> SinkLine {
        SinkLine {
            gateway: "gw-1".into(),
            device: "d".into(),
            key_id: 1,
            seq,
            received_ms: 5,
            json: Some(serde_json::json!({"v": seq})),
            base64: None,
            image_chunk: None,
        }
    }

    #[test]
    fn torn_tail_is_cut_and_the_tail_after_the_checkpoint_is_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("messages.jsonl");
        let checkpoint = {
            let (mut sink, tail) = JsonlSink::open(&path, 0).expect("open");
            assert!(tail.is_empty());
            sink.push(&line(1));
            let checkpoint = sink.commit().expect("commit");
            sink.push(&line(2));
            sink.push(&line(3));
            sink.commit().expect("commit");
            checkpoint
        };
        // A crash mid-write leaves half a line.
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(br#"{"gateway":"gw-1","dev"#).expect("write");
        drop(file);
        let (sink, tail) = JsonlSink::open(&path, checkpoint).expect("reopen");
        assert_eq!(tail, vec![line(2), line(3)]);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), 3);
        assert_eq!(sink.len(), text.len() as u64);
    }
}

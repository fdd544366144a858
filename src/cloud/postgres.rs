//! The PostgreSQL sink: accepted messages in one table that several ingest instances
//! share, each behind the same MQTT shared subscription (`$share/<group>/...`). The
//! table is also the replay state: this sink applies the replay rule itself, at commit.
//!
//! # Schema
//!
//! `messages(device text, seq bigint, key_id bigint, gateway text, received_ms bigint,
//! json jsonb, base64 text, image jsonb, PRIMARY KEY (device, seq))`, created if
//! missing. `image` is `{"image_id", "index", "count"}` for an image chunk. A JSON
//! reading that PostgreSQL's `jsonb` cannot hold (a `\u0000` in a string) is stored as
//! its JSON text in `base64` instead, so one odd reading cannot stop the ingest.
//!
//! # A batch
//!
//! One transaction: read each device's highest stored seq (`max(seq)`, an index
//! lookup); in arrival order, refuse as stale a seq more than
//! [`ReplayWindow::SPAN`] below the highest (stored or earlier in the batch) and as a
//! duplicate a repeat within the batch; insert the rest with `ON CONFLICT (device,
//! seq) DO NOTHING RETURNING`, where a row not returned was already stored (a
//! duplicate); commit. Only after the commit (PostgreSQL's default
//! `synchronous_commit = on` has then flushed the WAL) may the broker get its acks and
//! the devices their receipts.
//!
//! # Several instances
//!
//! - Exactly once: the primary key. When two instances insert the same `(device, seq)`,
//!   the second waits for the first's transaction and then sees the conflict (it
//!   committed) or inserts the row (it rolled back). Rows are inserted in `(device,
//!   seq)` order, so concurrent batches take their index locks in the same order; a
//!   deadlock is still retried.
//! - Staleness is best effort: the highest seq is read from committed rows only (READ
//!   COMMITTED), so a batch another instance commits meanwhile is not seen. The check
//!   can therefore only err towards accepting, and only an envelope just past the
//!   window's edge whose window was pushed by a batch within the last few batches on
//!   another instance. It never refuses a fresh envelope inside the window.
//! - Retention: the rows are the replay state. Deleting a device's rows forgets its
//!   window; keep at least its highest-seq row.

use std::collections::{BTreeSet, HashMap, HashSet};

use e3::{ReplayWindow, Verdict};
use thiserror::Error;
use tokio_postgres::{Client, Config, NoTls, Transaction};

use super::sink::SinkLine;

/// [`ReplayWindow::SPAN`] as a `bigint` (65536 fits).
const SPAN: i64 = ReplayWindow::SPAN as i64;

/// Serialises schema creation between instances starting at once (concurrent
/// `CREATE TABLE IF NOT EXISTS` can fail on the catalog's unique index).
const SCHEMA_LOCK: i64 = 0x626c_696e_6467_7467;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS messages (
    device text NOT NULL,
    seq bigint NOT NULL,
    key_id bigint NOT NULL,
    gateway text NOT NULL,
    received_ms bigint NOT NULL,
    json jsonb,
    base64 text,
    image jsonb,
    PRIMARY KEY (device, seq)
)";

const HIGHEST: &str = "SELECT d, (SELECT max(seq) FROM messages WHERE device = d) \
     FROM unnest($1::text[]) AS d";

const INSERT: &str = "INSERT INTO messages \
     (device, seq, key_id, gateway, received_ms, json, base64, image) \
     SELECT d, s, k, g, r, j::jsonb, b, i::jsonb \
     FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], \
     $6::text[], $7::text[], $8::text[]) AS t(d, s, k, g, r, j, b, i) \
     ORDER BY d, s \
     ON CONFLICT (device, seq) DO NOTHING \
     RETURNING device, seq";

/// How long a connection attempt may take unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Times a batch is retried after PostgreSQL broke a deadlock by aborting it.
const DEADLOCK_RETRIES: usize = 3;

/// Why the PostgreSQL sink failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The connection string does not parse.
    #[error("invalid PostgreSQL connection string")]
    Config(#[source] tokio_postgres::Error),
    /// The database is unreachable or refused the login.
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
    /// Creating the `messages` table failed.
    #[error("cannot create the messages table")]
    Schema(#[source] tokio_postgres::Error),
    /// The batch's transaction failed; none of it is stored or may be acknowledged.
    #[error("the batch's transaction failed")]
    Commit(#[source] tokio_postgres::Error),
    /// A seq above `i64::MAX` does not fit the `bigint` column.
    #[error("seq {seq} does not fit a bigint")]
    SeqRange {
        /// The seq.
        seq: u64,
    },
}

/// One message as its columns.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    device: String,
    seq: i64,
    key_id: i64,
    gateway: String,
    received_ms: i64,
    json: Option<String>,
    base64: Option<String>,
    image: Option<String>,
}

impl Row {
    fn from_line(line: &SinkLine) -> Result<Self, PostgresError> {
        let seq = i64::try_from(line.seq).map_err(|_| PostgresError::SeqRange { seq: line.seq })?;
        let mut json = line.json.as_ref().map(serde_json::Value::to_string);
        let mut base64 = line.base64.clone();
        if let Some(text) = json.take_if(|text| text.contains("\\u0000")) {
            base64 = Some(base64_of(text.as_bytes()));
        }
        let image = line.image_chunk.map(|(image_id, index, count)| {
            serde_json::json!({"image_id": image_id, "index": index, "count": count}).to_string()
        });
        Ok(Self {
            device: line.device.clone(),
            seq,
            key_id: i64::from(line.key_id),
            gateway: line.gateway.clone(),
            received_ms: i64::try_from(line.received_ms).unwrap_or(i64::MAX),
            json,
            base64,
            image,
        })
    }
}

/// A connection to the database and the batch not yet committed.
pub struct PostgresSink {
    /// Kept to reconnect when the connection dropped between batches; boxed, as it is
    /// large and rarely used.
    config: Box<Config>,
    client: Client,
    batch: Vec<Row>,
}

impl PostgresSink {
    /// Connects to `url` (`postgresql://user@host:port/db` or `host=... user=...`) and
    /// creates the `messages` table if missing.
    ///
    /// # Errors
    /// [`PostgresError::Config`], [`PostgresError::Connect`] or
    /// [`PostgresError::Schema`].
    pub async fn connect(url: &str) -> Result<Self, PostgresError> {
        let mut config: Config = url.parse().map_err(PostgresError::Config)?;
        config.application_name("blindgate-cloud");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let mut client = open(&config).await?;
        create_schema(&mut client)
            .await
            .map_err(PostgresError::Schema)?;
        Ok(Self {
            config: Box::new(config),
            client,
            batch: Vec::new(),
        })
    }

    /// Adds a message to the current batch (not yet written).
    ///
    /// # Errors
    /// [`PostgresError::SeqRange`]; nothing was added.
    pub fn push(&mut self, line: &SinkLine) -> Result<(), PostgresError> {
        self.batch.push(Row::from_line(line)?);
        Ok(())
    }

    /// Writes the batch in one transaction and returns the replay rule's verdict for
    /// each message, in the order they were pushed: `Fresh` (stored now), `Duplicate`
    /// (already stored, or earlier in this batch) or `Stale`. The batch is emptied
    /// either way.
    ///
    /// # Errors
    /// [`PostgresError::Connect`] or [`PostgresError::Commit`]: nothing of the batch
    /// may be acknowledged (the broker delivers it again; the table turns what was in
    /// fact stored into duplicates).
    pub async fn commit(&mut self) -> Result<Vec<Verdict>, PostgresError> {
        let rows = std::mem::take(&mut self.batch);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if self.client.is_closed() {
            tracing::warn!("PostgreSQL connection lost; reconnecting");
            self.client = open(&self.config).await?;
        }
        let mut retries = 0;
        loop {
            match write_batch(&mut self.client, &rows).await {
                Ok(verdicts) => return Ok(verdicts),
                Err(err) if is_deadlock(&err) && retries < DEADLOCK_RETRIES => {
                    retries += 1;
                    tracing::warn!(
                        retries,
                        "PostgreSQL aborted a batch to break a deadlock; retrying"
                    );
                }
                Err(err) => return Err(PostgresError::Commit(err)),
            }
        }
    }
}

async fn open(config: &Config) -> Result<Client, PostgresError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(PostgresError::Connect)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

async fn create_schema(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await
}

fn is_deadlock(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
}

async fn write_batch(
    client: &mut Client,
    rows: &[Row],
) -> Result<Vec<Verdict>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let decided = plan(rows, highest_stored(&tx, rows).await?);
    let inserted = insert(&tx, rows, &decided).await?;
    tx.commit().await?;
    Ok(resolve(rows, decided, &inserted))
}

/// Each batch device's highest stored seq (devices without rows are absent).
async fn highest_stored(
    tx: &Transaction<'_>,
    rows: &[Row],
) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
    let devices: Vec<&str> = rows
        .iter()
        .map(|r| r.device.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut highest = HashMap::new();
    for row in tx.query(HIGHEST, &[&devices]).await? {
        if let Some(seq) = row.try_get::<_, Option<i64>>(1)? {
            highest.insert(row.try_get::<_, String>(0)?, seq);
        }
    }
    Ok(highest)
}

/// The verdicts that need no insert, in arrival order: `Some(Stale)`,
/// `Some(Duplicate)` for a repeat within the batch, `None` for a row to insert.
fn plan(rows: &[Row], mut highest: HashMap<String, i64>) -> Vec<Option<Verdict>> {
    let mut seen = HashSet::new();
    rows.iter()
        .map(|row| {
            let top = highest.entry(row.device.clone()).or_insert(0);
            if *top - row.seq > SPAN {
                return Some(Verdict::Stale);
            }
            if !seen.insert((row.device.as_str(), row.seq)) {
                return Some(Verdict::Duplicate);
            }
            *top = (*top).max(row.seq);
            None
        })
        .collect()
}

/// Inserts the rows `decided` left open; returns those actually inserted.
async fn insert(
    tx: &Transaction<'_>,
    rows: &[Row],
    decided: &[Option<Verdict>],
) -> Result<HashSet<(String, i64)>, tokio_postgres::Error> {
    let open: Vec<&Row> = rows
        .iter()
        .zip(decided)
        .filter(|(_, verdict)| verdict.is_none())
        .map(|(row, _)| row)
        .collect();
    if open.is_empty() {
        return Ok(HashSet::new());
    }
    let column = |f: fn(&Row) -> Option<&str>| open.iter().map(|r| f(r)).collect::<Vec<_>>();
    let number = |f: fn(&Row) -> i64| open.iter().map(|r| f(r)).collect::<Vec<_>>();
    let returned = tx
        .query(
            INSERT,
            &[
                &column(|r| Some(r.device.as_str())),
                &number(|r| r.seq),
                &number(|r| r.key_id),
                &column(|r| Some(r.gateway.as_str())),
                &number(|r| r.received_ms),
                &column(|r| r.json.as_deref()),
                &column(|r| r.base64.as_deref()),
                &column(|r| r.image.as_deref()),
            ],
        )
        .await?;
    returned
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Final verdicts: a row left open is `Fresh` if the insert returned it, else it was
/// already stored (`Duplicate`).
fn resolve(
    rows: &[Row],
    decided: Vec<Option<Verdict>>,
    inserted: &HashSet<(String, i64)>,
) -> Vec<Verdict> {
    rows.iter()
        .zip(decided)
        .map(|(row, verdict)| {
            verdict.unwrap_or_else(|| {
                if inserted.contains(&(row.device.clone(), row.seq)) {
                    Verdict::Fresh
                } else {
                    Verdict::Duplicate
                }
            })
        })
        .collect()
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, seq: i64) -> Row {
        Row {
            device: device.into(),
            seq,
            key_id: 1,
            gateway: "gw-1".into(),
            received_ms: 5,
            json: None,
            base64: None,
            image: None,
        }
    }

    #[test]
    fn plan_refuses_stale_seqs_and_repeats_in_arrival_order() {
        let rows = [
            row("a", 10),
            row("a", 10),
            row("a", 100_000),
            row("a", 100_000 - 65_536),
            row("a", 100_000 - 65_537),
            row("b", 5),
            row("c", 1),
        ];
        let stored = HashMap::from([("b".to_owned(), 70_000), ("c".to_owned(), 3)]);
        let decided = plan(&rows, stored);
        use Verdict::{Duplicate, Stale};
        assert_eq!(
            decided,
            vec![
                None,
                Some(Duplicate),
                None,
                None,
                Some(Stale),
                Some(Stale),
                None
            ]
        );
    }

    #[test]
    fn rows_not_returned_by_the_insert_are_duplicates() {
        let rows = [row("a", 1), row("a", 2), row("a", 2)];
        let decided = vec![None, None, Some(Verdict::Duplicate)];
        let inserted = HashSet::from([("a".to_owned(), 2)]);
        assert_eq!(
            resolve(&rows, decided, &inserted),
            vec![Verdict::Duplicate, Verdict::Fresh, Verdict::Duplicate]
        );
    }

    #[test]
    fn a_reading_jsonb_cannot_hold_is_kept_as_text_and_chunks_as_objects() {
        let line = SinkLine {
            gateway: "gw-1".into(),
            device: "d".into(),
            key_id: 2,
            seq: 9,
            received_ms: 5,
            json: Some(serde_json::json!({"s": "a\u{0}b"})),
            base64: None,
            image_chunk: Some((7, 1, 3)),
        };
        let row = Row::from_line(&line).expect("fits");
        assert_eq!(row.json, None);
        assert_eq!(row.base64, Some(base64_of(br#"{"s":"a\u0000b"}"#)));
        assert_eq!(
            row.image.as_deref(),
            Some(r#"{"count":3,"image_id":7,"index":1}"#)
        );
        let too_big = SinkLine {
            seq: u64::MAX,
            ..line
        };
        assert!(matches!(
            Row::from_line(&too_big),
            Err(PostgresError::SeqRange { .. })
        ));
    }
}

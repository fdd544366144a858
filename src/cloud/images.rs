//! Reassembling camera images from their chunks. Chunks may arrive in any order and
//! more than once (resends); each is stored as a file (fsync'd before the message is
//! acknowledged), and when the last one is there the image is joined, checked against
//! its SHA-256, and written as `<dir>/<device>/<image id>.jpg`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::payload::ImageChunk;

/// What adding a chunk achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProgress {
    /// More chunks are needed.
    Partial,
    /// The image is complete, checked and written here.
    Complete(PathBuf),
    /// Every chunk is here but the SHA-256 or the length does not match; discarded.
    Corrupt,
}

/// Images being assembled and finished images, under one directory.
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// Uses (and creates) `dir`.
    ///
    /// # Errors
    /// If the directory cannot be created.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join(".partial"))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Stores one chunk of `device`'s image; joins the image when it is complete.
    ///
    /// # Errors
    /// Any I/O error (then the message must not be acknowledged).
    pub fn add(&self, device: &str, chunk: &ImageChunk<'_>) -> io::Result<ImageProgress> {
        let partial = self
            .dir
            .join(".partial")
            .join(device)
            .join(chunk.image_id.to_string());
        fs::create_dir_all(&partial)?;
        write_synced(&partial.join(format!("{}.part", chunk.index)), chunk.data)?;
        let parts = fs::read_dir(&partial)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .count();
        if parts < chunk.count as usize {
            return Ok(ImageProgress::Partial);
        }
        let mut image = Vec::with_capacity(usize::try_from(chunk.total_len).unwrap_or(0));
        for index in 0..chunk.count {
            image.extend(fs::read(partial.join(format!("{index}.part")))?);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &image);
        let progress = if image.len() as u64 == chunk.total_len && digest.as_ref() == chunk.sha256 {
            let out_dir = self.dir.join(device);
            fs::create_dir_all(&out_dir)?;
            let path = out_dir.join(format!("{}.jpg", chunk.image_id));
            write_synced(&path, &image)?;
            ImageProgress::Complete(path)
        } else {
            ImageProgress::Corrupt
        };
        fs::remove_dir_all(&partial)?;
        Ok(progress)
    }
}

/// Writes a file atomically (temp file, fsync, rename).
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_in_any_order_with_repeats_make_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(dir.path()).expect("open");
        let image: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let sha: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &image)
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let chunk = |index: u32| ImageChunk {
            image_id: 9,
            index,
            count: 3,
            total_len: 1000,
            sha256: sha,
            data: &image[index as usize * 400..((index as usize + 1) * 400).min(1000)],
        };
        assert_eq!(
            store.add("cam-1", &chunk(2)).expect("ok"),
            ImageProgress::Partial
        );
        assert_eq!(
            store.add("cam-1", &chunk(2)).expect("ok"),
            ImageProgress::Partial
        );
        assert_eq!(
            store.add("cam-1", &chunk(0)).expect("ok"),
            ImageProgress::Partial
        );
        let ImageProgress::Complete(path) = store.add("cam-1", &chunk(1)).expect("ok") else {
            panic!("complete expected");
        };
        assert_eq!(fs::read(path).expect("read"), image);
    }
}

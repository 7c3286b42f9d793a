//! Builders for test tar streams, including hostile ones the `tar` crate refuses to write.

use std::io::Write;

use tar::{EntryType, Header};

/// Builds one layer tar stream entry by entry.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry with raw name bytes (no validation at all).
    #[allow(clippy::too_many_arguments)]
    pub fn raw(
        mut self,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Self {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "use pax for long names"
        );
        let mut h = Header::new_ustar();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name);
        h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(name.as_bytes(), EntryType::Regular, b"", data, 0o644, 0, 0)
    }

    pub fn file_owned(self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Regular,
            b"",
            data,
            mode,
            uid,
            gid,
        )
    }

    pub fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), EntryType::Directory, b"", b"", 0o755, 0, 0)
    }

    pub fn dir_mode(self, name: &str, mode: u32) -> Self {
        self.raw(name.as_bytes(), EntryType::Directory, b"", b"", mode, 0, 0)
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
            0,
            0,
        )
    }

    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Link,
            target.as_bytes(),
            b"",
            0o644,
            0,
            0,
        )
    }

    pub fn device(mut self, name: &str, kind: EntryType, major: u32, minor: u32) -> Self {
        let mut h = Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.b.append(&h, &b""[..]).unwrap();
        self
    }

    /// A regular file preceded by a PAX header with the given records.
    pub fn pax_file(mut self, name: &str, records: &[(&str, &[u8])], data: &[u8]) -> Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self.file(name, data)
    }

    /// Appends raw bytes (already block-aligned headers and data).
    pub fn raw_bytes(mut self, bytes: &[u8]) -> Self {
        self.b.get_mut().write_all(bytes).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

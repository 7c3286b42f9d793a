//! OCI images to ext4 root filesystems.

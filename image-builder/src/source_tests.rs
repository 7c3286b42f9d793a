//! Sources generated in a tempdir: docker-archive, oci-archive, oci directory.

use super::*;
use crate::testutil::*;

fn layers() -> Vec<Vec<u8>> {
    vec![
        LayerBuilder::new().file("a", b"1").finish(),
        LayerBuilder::new().file("b", b"2").finish(),
    ]
}

fn read_all_layers(r: &Resolved) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for l in &r.layers {
        let mut blob = r.open_layer(l)?;
        let mut v = Vec::new();
        blob.read_to_end(&mut v).unwrap();
        blob.finish()?;
        out.push(v);
    }
    Ok(out)
}

#[test]
fn parses_references() {
    assert_eq!(
        ImageRef::parse("docker-archive:/x/y.tar:busybox:latest").unwrap(),
        ImageRef::DockerArchive {
            path: "/x/y.tar:busybox".into(),
            name: Some("latest".into())
        }
    );
    assert_eq!(
        ImageRef::parse("oci:/does/not/exist:v1").unwrap(),
        ImageRef::OciDir {
            path: "/does/not/exist".into(),
            tag: Some("v1".into())
        }
    );
    assert_eq!(
        ImageRef::parse("busybox:latest").unwrap(),
        ImageRef::Registry("docker.io/library/busybox:latest".into())
    );
    assert_eq!(
        ImageRef::parse("localhost:5000/busybox")
            .unwrap()
            .to_string(),
        "localhost:5000/busybox:latest"
    );
    assert_eq!(
        ImageRef::parse("docker-daemon:alpine:3").unwrap(),
        ImageRef::DockerDaemon("alpine:3".into())
    );
    assert_eq!(
        ImageRef::parse("docker-daemon:alpine:3")
            .unwrap()
            .to_string(),
        "docker-daemon:alpine:3"
    );
    assert!(ImageRef::parse("docker-daemon:").is_err());
    assert!(ImageRef::parse("docker-daemon:--help").is_err());
    assert_eq!(
        Platform::parse("linux/arm64/v8")
            .unwrap()
            .variant
            .as_deref(),
        Some("v8")
    );
    assert!(Platform::parse("linux").is_err());
}

#[test]
fn oci_dir_and_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    write_oci_layout(&dir, &layers(), "v1");
    let r = resolve(
        &ImageRef::parse(&format!("oci:{}", dir.display())).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(
        r.config.config.cmd.as_deref(),
        Some(&["single".to_string()][..])
    );
    assert_eq!(r.layers.len(), 2);
    assert_eq!(r.config_digest, crate::digest::sha256(&r.config_raw));
    let blobs = read_all_layers(&r).unwrap();
    assert_eq!(blobs[0], gzip(&layers()[0]));

    let by_tag = ImageRef::OciDir {
        path: dir.clone(),
        tag: Some("v1".into()),
    };
    assert!(resolve(&by_tag, None).is_ok());
    let missing = ImageRef::OciDir {
        path: dir.clone(),
        tag: Some("nope".into()),
    };
    assert!(resolve(&missing, None).is_err());

    let ar = tmp.path().join("layout.tar");
    tar_dir(&dir, &ar);
    let r = resolve(
        &ImageRef::parse(&format!("oci-archive:{}", ar.display())).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(read_all_layers(&r).unwrap().len(), 2);
}

#[test]
fn multiplatform_index_picks_the_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let amd = vec![LayerBuilder::new().file("amd", b"x").finish()];
    let arm = vec![LayerBuilder::new().file("arm", b"y").finish()];
    write_multiarch_layout(tmp.path(), &amd, &arm);
    let r = ImageRef::OciDir {
        path: tmp.path().into(),
        tag: None,
    };
    let amd64 = Platform::parse("linux/amd64").unwrap();
    let got = resolve(&r, Some(&amd64)).unwrap();
    assert_eq!(got.config.architecture, "amd64");
    let arm64 = Platform::parse("linux/arm64").unwrap();
    let got = resolve(&r, Some(&arm64)).unwrap();
    assert_eq!(got.config.architecture, "arm64");
    let err = resolve(&r, Some(&Platform::parse("linux/s390x").unwrap())).unwrap_err();
    assert!(err.to_string().contains("linux/amd64"), "{err}");
}

#[test]
fn tampered_blobs_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    write_oci_layout(tmp.path(), &layers(), "v1");
    let r = ImageRef::OciDir {
        path: tmp.path().into(),
        tag: None,
    };
    let resolved = resolve(&r, None).unwrap();
    // Corrupt the first layer blob in place (same size).
    let p = tmp.path().join(&resolved.layers[0].locator);
    let mut data = std::fs::read(&p).unwrap();
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&p, &data).unwrap();
    let err = read_all_layers(&resolved).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");

    // A tampered config no longer matches the manifest's digest.
    let cfg = tmp
        .path()
        .join("blobs/sha256")
        .join(resolved.config_digest.strip_prefix("sha256:").unwrap());
    std::fs::write(&cfg, b"{}").unwrap();
    let err = resolve(&r, None).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[test]
fn docker_archive_legacy_format() {
    let tmp = tempfile::tempdir().unwrap();
    let ar = tmp.path().join("img.tar");
    write_docker_archive(&ar, &layers(), "example/app:1.0");
    let r = resolve(
        &ImageRef::parse(&format!("docker-archive:{}", ar.display())).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(
        r.config.config.cmd.as_deref(),
        Some(&["docker".to_string()][..])
    );
    assert_eq!(read_all_layers(&r).unwrap(), layers());
    let named = ImageRef::DockerArchive {
        path: ar.clone(),
        name: Some("example/app:1.0".into()),
    };
    assert!(resolve(&named, None).is_ok());
    let wrong = ImageRef::DockerArchive {
        path: ar,
        name: Some("other".into()),
    };
    assert!(resolve(&wrong, None).is_err());
}

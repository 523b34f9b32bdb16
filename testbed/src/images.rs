//! Locally built OCI images for the testbed: no registry is reachable, so the
//! three images the demo and the tests need are built here, as OCI
//! image-layout tarballs, and imported into containerd with `ctr`.
//!
//! Invariants:
//! - Output is deterministic: fixed mtimes, owners and entry order, an
//!   uncompressed outer tar and a gzip layer without a name or timestamp, so
//!   the same inputs always give the same manifest digest and image id.
//! - Built tarballs (and the compiled C programs) are cached under the
//!   caller's cache dir, keyed by a hash of everything that goes into them,
//!   and written with a temporary name and an atomic rename, so test
//!   processes running in parallel can share one cache dir.
//! - The image names are the constants below; `ensure_images` imports all
//!   three into containerd's `k8s.io` namespace, where the CRI sees them at
//!   once.
//! - The agent's own image ([`AGENT_IMAGE`], for running the DaemonSet's pod
//!   on the testbed) is built on demand from a cargo-built binary and the
//!   shared libraries `ldd` names for it, with `deploy/Dockerfile`'s
//!   entrypoint and command.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::containerd::TestbedError;

/// The sandbox ("pause") image; containerd's `sandbox_image` names it.
pub const PAUSE_IMAGE: &str = "ephemerald.local/pause:3.10";
/// The debug image: Debian's static busybox with its applets under `/bin`.
pub const BUSYBOX_IMAGE: &str = "ephemerald.local/busybox:1.35";
/// The shell-less ("distroless") app image: one static binary, `/app`.
pub const APP_IMAGE: &str = "ephemerald.local/app:1.0";
/// The agent's image, [`build_agent`] builds it from a local binary. It is
/// not among [`ALL_IMAGES`]: only the DaemonSet test imports it.
pub const AGENT_IMAGE: &str = "ephemerald.local/ephemerald:dev";
/// Where `deploy/Dockerfile` installs the agent, its `ENTRYPOINT`.
pub const AGENT_BIN_IN_IMAGE: &str = "/usr/local/bin/ephemerald";
/// `deploy/Dockerfile`'s `CMD`, the arguments when a pod gives none.
pub const AGENT_CMD: [&str; 1] = ["run"];
/// Debian's CA bundle (package `ca-certificates`), copied into the agent's image.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// All images the testbed imports, in import order.
pub const ALL_IMAGES: [&str; 3] = [PAUSE_IMAGE, BUSYBOX_IMAGE, APP_IMAGE];

/// The `PATH` every image's config sets.
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Source of the pause program (`/pause` in [`PAUSE_IMAGE`]).
pub const PAUSE_C: &str = include_str!("pause.c");
/// Source of the app program (`/app` in [`APP_IMAGE`]).
pub const APP_C: &str = include_str!("app.c");

/// Where Debian's `busybox-static` installs its binary.
pub const BUSYBOX_BIN: &str = "/bin/busybox";

/// Bumped whenever the tarball layout changes, so old cache entries are not reused.
const FORMAT_VERSION: &str = "ephemerald-oci-v1";
/// Flags for the C programs: static (the images hold no libc), small, stripped.
const CFLAGS: [&str; 6] = ["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror"];

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One entry of an image's single layer. Paths are relative to the image root
/// (`bin/sh`, not `/bin/sh`); parent directories must be listed explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntry {
    /// A directory with its permission bits.
    Dir {
        /// Path inside the image.
        path: String,
        /// Permission bits, e.g. `0o755`.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path inside the image.
        path: String,
        /// Permission bits, e.g. `0o755`.
        mode: u32,
        /// The file's bytes.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path inside the image.
        path: String,
        /// What the link points to (relative or absolute).
        target: String,
    },
}

/// What goes into an image's config besides its layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env` (`KEY=value`); [`IMAGE_PATH`] is always set first.
    pub env: Vec<String>,
}

/// A built (or cached) image tarball.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The full image name, e.g. [`BUSYBOX_IMAGE`].
    pub name: String,
    /// The OCI image-layout tarball.
    pub tarball: PathBuf,
    /// `sha256:…` of the manifest (what `ctr images ls` shows as the digest).
    pub manifest_digest: String,
    /// `sha256:…` of the config: the image id the CRI reports.
    pub image_id: String,
}

/// Builds (or takes from the cache) the pause image.
pub fn build_pause(cache_dir: &Path) -> Result<BuiltImage, TestbedError> {
    let pause = compile_static(cache_dir, "pause", PAUSE_C)?;
    let entries = vec![LayerEntry::File {
        path: "pause".into(),
        mode: 0o755,
        data: read(&pause)?,
    }];
    let config = ImageConfig {
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
        env: vec![],
    };
    build_image(cache_dir, PAUSE_IMAGE, &entries, &config)
}

/// Builds (or takes from the cache) the shell-less app image.
pub fn build_app(cache_dir: &Path) -> Result<BuiltImage, TestbedError> {
    let app = compile_static(cache_dir, "app", APP_C)?;
    let entries = vec![LayerEntry::File {
        path: "app".into(),
        mode: 0o755,
        data: read(&app)?,
    }];
    let config = ImageConfig {
        entrypoint: vec!["/app".into()],
        cmd: vec![],
        env: vec![],
    };
    build_image(cache_dir, APP_IMAGE, &entries, &config)
}

/// Builds (or takes from the cache) the busybox image from the host's
/// [`BUSYBOX_BIN`]: the binary, one symlink per applet under `/bin`, an
/// `/etc/passwd` and `/etc/group` with root and nobody, and an empty `/tmp`.
pub fn build_busybox(cache_dir: &Path) -> Result<BuiltImage, TestbedError> {
    let busybox = read(Path::new(BUSYBOX_BIN))?;
    let list = run(Command::new(BUSYBOX_BIN).arg("--list"), "busybox")?;
    let mut applets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .collect();
    applets.sort_unstable();
    applets.dedup();

    let mut entries = vec![
        LayerEntry::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        LayerEntry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox,
        },
    ];
    entries.extend(applets.iter().map(|applet| LayerEntry::Symlink {
        path: format!("bin/{applet}"),
        target: "busybox".into(),
    }));
    entries.extend([
        LayerEntry::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        LayerEntry::File {
            path: "etc/passwd".into(),
            mode: 0o644,
            data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
        },
        LayerEntry::File {
            path: "etc/group".into(),
            mode: 0o644,
            data: b"root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n".to_vec(),
        },
        LayerEntry::Dir {
            path: "root".into(),
            mode: 0o700,
        },
        LayerEntry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
    ]);
    let config = ImageConfig {
        entrypoint: vec![],
        cmd: vec!["sh".into()],
        env: vec![],
    };
    build_image(cache_dir, BUSYBOX_IMAGE, &entries, &config)
}

/// Builds (or takes from the cache) the agent's image from `binary` (a
/// cargo-built `ephemerald`): the binary at [`AGENT_BIN_IN_IMAGE`] plus the
/// dynamic loader and shared libraries `ldd` lists for it, each at the path
/// `ldd` shows, so the loader finds them in its default directories. The
/// config matches `deploy/Dockerfile`: `ENTRYPOINT ["/usr/local/bin/ephemerald"]`,
/// `CMD ["run"]`. Besides, only the host's CA bundle ([`CA_BUNDLE`], the
/// Dockerfile's `ca-certificates`): the Kubernetes client builds its TLS
/// set-up from the system's roots whenever the kubeconfig names no CA, even
/// for a plain-http server, and refuses to start without any. No shell.
pub fn build_agent(cache_dir: &Path, binary: &Path) -> Result<BuiltImage, TestbedError> {
    let ldd = run(Command::new("ldd").arg(binary), "ldd")?;
    if let Some(line) = ldd.lines().find(|l| l.contains("not found")) {
        return Err(TestbedError::Invalid(format!(
            "{}: a shared library is missing: {}",
            binary.display(),
            line.trim()
        )));
    }
    // (path in the image, mode, bytes)
    let mut files = vec![
        (AGENT_BIN_IN_IMAGE, 0o755, read(binary)?),
        (CA_BUNDLE, 0o644, read(Path::new(CA_BUNDLE))?),
    ];
    let libs = shared_libraries(&ldd);
    for lib in &libs {
        files.push((lib, 0o755, read(Path::new(lib))?));
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in &files {
        let mut parent = Path::new(path.trim_start_matches('/')).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.display().to_string());
            parent = p.parent();
        }
    }
    // BTreeSet order puts every parent before its children.
    let mut entries: Vec<LayerEntry> = dirs
        .into_iter()
        .map(|path| LayerEntry::Dir { path, mode: 0o755 })
        .collect();
    entries.extend(
        files
            .into_iter()
            .map(|(path, mode, data)| LayerEntry::File {
                path: path.trim_start_matches('/').to_string(),
                mode,
                data,
            }),
    );
    let config = ImageConfig {
        entrypoint: vec![AGENT_BIN_IN_IMAGE.into()],
        cmd: AGENT_CMD.map(String::from).to_vec(),
        env: vec![],
    };
    build_image(cache_dir, AGENT_IMAGE, &entries, &config)
}

/// The absolute paths of the shared objects in `ldd` output, the dynamic
/// loader included (`libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x…)`); the kernel's vDSO has no file.
fn shared_libraries(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            path.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
        })
        .collect()
}

/// Builds (or takes from the cache) all three images, in [`ALL_IMAGES`] order.
pub fn build_all(cache_dir: &Path) -> Result<Vec<BuiltImage>, TestbedError> {
    Ok(vec![
        build_pause(cache_dir)?,
        build_busybox(cache_dir)?,
        build_app(cache_dir)?,
    ])
}

/// Imports an OCI image-layout tarball into containerd's `k8s.io` namespace
/// (the CRI's), unpacked for the default snapshotter, via
/// `ctr -a SOCKET -n k8s.io images import FILE`. The CRI sees the image as
/// soon as this returns.
pub fn import(socket: &Path, tarball: &Path) -> Result<(), TestbedError> {
    run(
        Command::new("ctr")
            .arg("-a")
            .arg(socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(tarball),
        "ctr",
    )
    .map(drop)
}

/// Builds (cached) and imports the three images into the containerd
/// listening on `socket`.
pub fn ensure_images(socket: &Path, cache_dir: &Path) -> Result<Vec<BuiltImage>, TestbedError> {
    let images = build_all(cache_dir)?;
    for image in &images {
        import(socket, &image.tarball)?;
    }
    Ok(images)
}

/// Builds an OCI image-layout tarball holding one gzip layer made of
/// `entries`, named `name` (`registry/repo:tag`), or returns the cached one
/// built from the same inputs.
pub fn build_image(
    cache_dir: &Path,
    name: &str,
    entries: &[LayerEntry],
    config: &ImageConfig,
) -> Result<BuiltImage, TestbedError> {
    let tag = image_tag(name)?;
    let key = cache_key(name, entries, config);
    let dir = cache_dir.join("images");
    let stem = format!("{}-{}", slug(name), &key[..16]);
    let tarball = dir.join(format!("{stem}.tar"));
    let meta = dir.join(format!("{stem}.json"));
    if tarball.is_file()
        && let Ok(text) = std::fs::read_to_string(&meta)
        && let Ok(cached) = serde_json::from_str::<serde_json::Value>(&text)
        && let (Some(manifest), Some(id)) = (cached["manifest"].as_str(), cached["id"].as_str())
    {
        return Ok(BuiltImage {
            name: name.to_string(),
            tarball,
            manifest_digest: manifest.to_string(),
            image_id: id.to_string(),
        });
    }

    let layer_tar = layer_tar(entries)?;
    let diff_id = sha256_digest(&layer_tar);
    let layer_gz = gzip(&layer_tar)?;
    let layer_digest = sha256_digest(&layer_gz);

    let mut env = vec![format!("PATH={IMAGE_PATH}")];
    env.extend(
        config
            .env
            .iter()
            .filter(|e| !e.starts_with("PATH="))
            .cloned(),
    );
    let mut image_config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "ephemerald testbed" }],
    });
    if !config.entrypoint.is_empty() {
        image_config["config"]["Entrypoint"] = json!(config.entrypoint);
    }
    if !config.cmd.is_empty() {
        image_config["config"]["Cmd"] = json!(config.cmd);
    }
    let config_bytes = to_json(&image_config);
    let config_digest = sha256_digest(&config_bytes);

    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_bytes.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_gz.len() }],
    });
    let manifest_bytes = to_json(&manifest);
    let manifest_digest = sha256_digest(&manifest_bytes);

    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });

    let mut outer = new_tar();
    append_dir(&mut outer, "blobs", 0o755)?;
    append_dir(&mut outer, "blobs/sha256", 0o755)?;
    for (digest, bytes) in [
        (&config_digest, &config_bytes),
        (&layer_digest, &layer_gz),
        (&manifest_digest, &manifest_bytes),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        append_file(&mut outer, &format!("blobs/sha256/{hex}"), 0o644, bytes)?;
    }
    append_file(&mut outer, "index.json", 0o644, &to_json(&index))?;
    append_file(
        &mut outer,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let outer = outer
        .into_inner()
        .map_err(|e| io_error("write tarball for", Path::new(name), e))?;

    create_dir_all(&dir)?;
    let meta_json = to_json(&json!({ "manifest": manifest_digest, "id": config_digest }));
    // The sidecar first: a tarball that exists always has its metadata.
    write_atomic(&meta, &meta_json)?;
    write_atomic(&tarball, &outer)?;
    Ok(BuiltImage {
        name: name.to_string(),
        tarball,
        manifest_digest,
        image_id: config_digest,
    })
}

/// Compiles a C program with `gcc -static -Os` into `<cache_dir>/bin`, keyed
/// by the source, the flags and the compiler's version; returns the binary.
pub fn compile_static(cache_dir: &Path, name: &str, source: &str) -> Result<PathBuf, TestbedError> {
    let gcc_version = run(Command::new("gcc").arg("-dumpfullversion"), "gcc")?;
    let mut h = Sha256::new();
    for part in [
        FORMAT_VERSION,
        name,
        source,
        &CFLAGS.join(" "),
        gcc_version.trim(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let key = hex(&h.finalize());
    let dir = cache_dir.join("bin");
    let out = dir.join(format!("{name}-{}", &key[..16]));
    if out.is_file() {
        return Ok(out);
    }
    create_dir_all(&dir)?;
    let src = dir.join(format!("{name}-{}.c", &key[..16]));
    write_atomic(&src, source.as_bytes())?;
    let tmp = temp_path(&out);
    let result = run(
        Command::new("gcc")
            .args(CFLAGS)
            .arg("-o")
            .arg(&tmp)
            .arg(&src),
        "gcc",
    );
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &out).map_err(|e| io_error("rename", &tmp, e))?;
    Ok(out)
}

/// `ephemerald.local/pause:3.10` → `3.10`.
fn image_tag(name: &str) -> Result<&str, TestbedError> {
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((_, tag)) if !tag.is_empty() => Ok(tag),
        _ => Err(TestbedError::Invalid(format!(
            "image name {name:?} has no tag"
        ))),
    }
}

/// `ephemerald.local/pause:3.10` → `ephemerald.local_pause_3.10`.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Hash of everything the tarball is made of.
fn cache_key(name: &str, entries: &[LayerEntry], config: &ImageConfig) -> String {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part(FORMAT_VERSION.as_bytes());
    part(name.as_bytes());
    for entry in entries {
        match entry {
            LayerEntry::Dir { path, mode } => {
                part(b"dir");
                part(path.as_bytes());
                part(&mode.to_le_bytes());
            }
            LayerEntry::File { path, mode, data } => {
                part(b"file");
                part(path.as_bytes());
                part(&mode.to_le_bytes());
                part(data);
            }
            LayerEntry::Symlink { path, target } => {
                part(b"symlink");
                part(path.as_bytes());
                part(target.as_bytes());
            }
        }
    }
    for list in [&config.entrypoint, &config.cmd, &config.env] {
        part(b"list");
        for s in list {
            part(s.as_bytes());
        }
    }
    hex(&h.finalize())
}

fn layer_tar(entries: &[LayerEntry]) -> Result<Vec<u8>, TestbedError> {
    let mut tar = new_tar();
    for entry in entries {
        match entry {
            LayerEntry::Dir { path, mode } => append_dir(&mut tar, path, *mode)?,
            LayerEntry::File { path, mode, data } => append_file(&mut tar, path, *mode, data)?,
            LayerEntry::Symlink { path, target } => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut header, path, target)
                    .map_err(|e| io_error("add symlink to layer", Path::new(path), e))?;
            }
        }
    }
    tar.into_inner()
        .map_err(|e| io_error("finish layer", Path::new("layer.tar"), e))
}

fn new_tar() -> tar::Builder<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    tar
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> Result<(), TestbedError> {
    let mut header = header(tar::EntryType::Directory, mode, 0);
    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
        .map_err(|e| io_error("add directory to tarball", Path::new(path), e))
}

fn append_file(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
) -> Result<(), TestbedError> {
    let mut header = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut header, path, data)
        .map_err(|e| io_error("add file to tarball", Path::new(path), e))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>, TestbedError> {
    // GzBuilder writes no file name and mtime 0: the bytes depend on the input only.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(data)
        .and_then(|()| gz.finish())
        .map_err(|e| io_error("gzip", Path::new("layer.tar"), e))
}

fn to_json(value: &serde_json::Value) -> Vec<u8> {
    // Serialising a Value cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn read(path: &Path) -> Result<Vec<u8>, TestbedError> {
    std::fs::read(path).map_err(|e| io_error("read", path, e))
}

fn create_dir_all(path: &Path) -> Result<(), TestbedError> {
    std::fs::create_dir_all(path).map_err(|e| io_error("create directory", path, e))
}

/// A name next to `path` that no other process or thread uses.
fn temp_path(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `data` to a temporary file and renames it over `path`, so readers
/// in other processes see either nothing or the whole file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TestbedError> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, data).map_err(|e| io_error("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error("rename", &tmp, e)
    })
}

fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> TestbedError {
    TestbedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs a helper program and returns its stdout; a missing program or a
/// non-zero exit is an error that carries the program's stderr.
pub(crate) fn run(cmd: &mut Command, program: &'static str) -> Result<String, TestbedError> {
    let output = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            TestbedError::MissingProgram { program }
        } else {
            io_error("run", Path::new(program), e)
        }
    })?;
    if !output.status.success() {
        return Err(TestbedError::Command {
            command: format!("{cmd:?}"),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A pod as a client would create it, in `default`, labelled `app=NAME`,
/// running [`APP_IMAGE`] as container `app` (pull policy `Never`: it is only
/// on the node), with a 1 s termination grace. Callers add the node, the
/// network mode or a uid as they need.
pub fn app_pod(name: &str) -> k8s_openapi::api::core::v1::Pod {
    use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some([("app".to_string(), name.to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            termination_grace_period_seconds: Some(1),
            containers: vec![Container {
                name: "app".into(),
                image: Some(APP_IMAGE.into()),
                image_pull_policy: Some("Never".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<LayerEntry>, ImageConfig) {
        let entries = vec![
            LayerEntry::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            LayerEntry::File {
                path: "bin/hello".into(),
                mode: 0o755,
                data: b"#!/bin/sh\necho hi\n".to_vec(),
            },
            LayerEntry::Symlink {
                path: "bin/hi".into(),
                target: "hello".into(),
            },
        ];
        let config = ImageConfig {
            entrypoint: vec!["/bin/hello".into()],
            cmd: vec![],
            env: vec!["A=b".into()],
        };
        (entries, config)
    }

    fn read_tar(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        let mut files = std::collections::BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            files.insert(name, data);
        }
        files
    }

    #[test]
    fn image_layout_has_correct_digests_sizes_and_names() {
        let cache = tempfile::tempdir().unwrap();
        let (entries, config) = sample();
        let built =
            build_image(cache.path(), "example.local/hello:1.2", &entries, &config).unwrap();
        let files = read_tar(&built.tarball);

        assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            "example.local/hello:1.2"
        );
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            "1.2"
        );
        assert_eq!(desc["digest"], built.manifest_digest.as_str());

        let blob = |digest: &str| files[&format!("blobs/sha256/{}", &digest[7..])].clone();
        let manifest_bytes = blob(&built.manifest_digest);
        assert_eq!(desc["size"], manifest_bytes.len());
        assert_eq!(sha256_digest(&manifest_bytes), built.manifest_digest);
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();

        let config_digest = manifest["config"]["digest"].as_str().unwrap();
        assert_eq!(config_digest, built.image_id);
        let config_bytes = blob(config_digest);
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        assert_eq!(sha256_digest(&config_bytes), config_digest);
        let image_config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
        assert_eq!(image_config["architecture"], "amd64");
        assert_eq!(image_config["os"], "linux");
        assert_eq!(image_config["config"]["Entrypoint"], json!(["/bin/hello"]));
        assert_eq!(
            image_config["config"]["Env"],
            json!([format!("PATH={IMAGE_PATH}"), "A=b"])
        );

        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        let layer_gz = blob(layer_digest);
        assert_eq!(manifest["layers"][0]["size"], layer_gz.len());
        assert_eq!(sha256_digest(&layer_gz), layer_digest);
        let mut layer = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&layer_gz[..]), &mut layer)
            .unwrap();
        assert_eq!(image_config["rootfs"]["diff_ids"][0], sha256_digest(&layer));

        let mut archive = tar::Archive::new(&layer[..]);
        let names: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("bin/".to_string(), 0),
                ("bin/hello".to_string(), 0),
                ("bin/hi".to_string(), 0)
            ]
        );
    }

    #[test]
    fn same_inputs_give_the_same_digest_and_a_cache_hit() {
        let (entries, config) = sample();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = build_image(a.path(), "example.local/hello:1.2", &entries, &config).unwrap();
        let other = build_image(b.path(), "example.local/hello:1.2", &entries, &config).unwrap();
        assert_eq!(first.manifest_digest, other.manifest_digest);
        assert_eq!(
            std::fs::read(&first.tarball).unwrap(),
            std::fs::read(&other.tarball).unwrap()
        );
        let again = build_image(a.path(), "example.local/hello:1.2", &entries, &config).unwrap();
        assert_eq!(again, first);

        let mut changed = entries.clone();
        changed.pop();
        let different =
            build_image(a.path(), "example.local/hello:1.2", &changed, &config).unwrap();
        assert_ne!(different.manifest_digest, first.manifest_digest);
        assert_ne!(different.tarball, first.tarball);
    }

    #[test]
    fn shared_libraries_come_from_ldd_output_with_the_loader_and_without_the_vdso() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd1a5f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0f1c7a0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0f1c400000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0f1c7e0000)\n";
        assert_eq!(
            shared_libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn a_name_without_a_tag_is_refused() {
        let (entries, config) = sample();
        let cache = tempfile::tempdir().unwrap();
        let err = build_image(cache.path(), "example.local/hello", &entries, &config).unwrap_err();
        assert!(matches!(err, TestbedError::Invalid(_)), "{err}");
        assert_eq!(image_tag("localhost:5000/x:y").unwrap(), "y");
    }
}

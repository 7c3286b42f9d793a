//! Running an OCI image: build (or reuse) its ext4 rootfs with the image-builder library and
//! merge the image config's process defaults with the user's flags, as `docker run` does.

use std::path::PathBuf;

use agentvm_image::{BuildOptions, ContainerConfig, ImageRef};

use crate::error::{Error, Result};

/// What the user said on the command line (each `None`/empty = "use the image's").
#[derive(Debug, Clone, Default)]
pub struct UserProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// The merged result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
}

/// Docker's rules: args = Entrypoint + (user args, or else the image's Cmd); env = the
/// image's, then the user's (same key: the user wins); cwd = -w, else WorkingDir, else `/`;
/// user = -u, else the image's User.
pub fn merge(user: &UserProcess, image: &ContainerConfig) -> Result<MergedProcess> {
    let mut args: Vec<String> = image.entrypoint.clone().unwrap_or_default();
    if user.args.is_empty() {
        args.extend(image.cmd.clone().unwrap_or_default());
    } else {
        args.extend(user.args.iter().cloned());
    }
    if args.is_empty() {
        return Err(Error::Invalid(
            "no command: the image has no Entrypoint or Cmd; give one after --".into(),
        ));
    }
    let mut env: Vec<String> = image.env.clone().unwrap_or_default();
    for e in &user.env {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let cwd = user
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    let user_spec = user
        .user
        .clone()
        .or_else(|| image.user.clone().filter(|u| !u.is_empty()));
    Ok(MergedProcess {
        args,
        env,
        cwd,
        user: user_spec,
    })
}

/// Builds or reuses the cached ext4 of `reference`; returns it and the image's defaults.
pub fn prepare(reference: &str) -> Result<(PathBuf, ContainerConfig)> {
    let r = ImageRef::parse(reference)
        .map_err(|e| Error::Invalid(format!("image {reference:?}: {e}")))?;
    let cache = agentvm_image::cache::default_dir();
    let opts = BuildOptions::new(&cache);
    let built = agentvm_image::build(&r, &opts)
        .map_err(|e| Error::Invalid(format!("image {reference}: {e}")))?;
    Ok((built.rootfs, built.config.config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ContainerConfig {
        ContainerConfig {
            entrypoint: Some(vec!["/entry".into()]),
            cmd: Some(vec!["default".into(), "cmd".into()]),
            env: Some(vec!["PATH=/img/bin".into(), "A=1".into()]),
            working_dir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        }
    }

    #[test]
    fn image_defaults_apply_when_the_user_gives_none() {
        let m = merge(&UserProcess::default(), &image()).unwrap();
        assert_eq!(m.args, vec!["/entry", "default", "cmd"]);
        assert_eq!(m.env, vec!["PATH=/img/bin", "A=1"]);
        assert_eq!(m.cwd, "/srv");
        assert_eq!(m.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn user_flags_override_like_docker_run() {
        let u = UserProcess {
            args: vec!["x".into()],
            env: vec!["A=2".into(), "B=3".into()],
            workdir: Some("/tmp".into()),
            user: Some("0".into()),
        };
        let m = merge(&u, &image()).unwrap();
        assert_eq!(
            m.args,
            vec!["/entry", "x"],
            "args replace Cmd, not Entrypoint"
        );
        assert_eq!(m.env, vec!["PATH=/img/bin", "A=2", "B=3"]);
        assert_eq!(m.cwd, "/tmp");
        assert_eq!(m.user.as_deref(), Some("0"));
    }

    #[test]
    fn no_command_at_all_is_an_error() {
        let err = merge(&UserProcess::default(), &ContainerConfig::default()).unwrap_err();
        assert!(err.to_string().contains("no command"));
    }
}

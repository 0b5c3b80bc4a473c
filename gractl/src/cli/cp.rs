//! `gractl cp`: files to and from a runner's workspace over SFTP.

use std::{
    io::{self, Write},
    path::PathBuf,
    sync::Arc,
};

use clap::Args;
use indicatif::HumanBytes;

use super::Context;
use crate::{
    exit::{Code, Failure},
    output::{self, Format},
    ssh,
    transfer::{self, Location, PARALLEL_FILES},
};

#[derive(Debug, Args)]
pub struct CpArgs {
    /// SOURCE... DEST: local paths and RUNNER:PATH, one side on a runner.
    /// PATH is relative to the runner's workspace (`r1:code/x.py`, and
    /// `r1:/outputs` is the same as `r1:outputs`); a local path with a colon
    /// needs a slash before it (`./a:b`)
    #[arg(required = true, num_args = 2.., value_name = "PATH")]
    paths: Vec<String>,
    /// Copy directories and everything in them
    #[arg(short, long)]
    recursive: bool,
}

/// What `gractl cp` was asked to do, once the paths are understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    Upload {
        sources: Vec<PathBuf>,
        runner: String,
        dest: String,
    },
    Download {
        runner: String,
        sources: Vec<String>,
        dest: PathBuf,
    },
}

impl Copy {
    /// Sorts `paths` (sources, then the destination) into one direction, or
    /// says why not.
    pub fn parse(paths: &[String]) -> Result<Copy, Failure> {
        let usage = |message: String| Failure::new(Code::Usage, message);
        let Some((dest, sources)) = paths.split_last().filter(|(_, s)| !s.is_empty()) else {
            return Err(usage("gractl cp needs a SOURCE and a DEST".into()));
        };
        let sources: Vec<Location> = sources.iter().map(|s| Location::parse(s)).collect();
        match Location::parse(dest) {
            Location::Remote { runner, path } => {
                let mut local = Vec::new();
                for source in sources {
                    match source {
                        Location::Local(path) => local.push(path),
                        remote @ Location::Remote { .. } => {
                            return Err(usage(format!(
                                "cannot copy from {remote} to {runner}:{path} directly: \
                                 copy from a runner to this machine, or from here to a runner"
                            )));
                        }
                    }
                }
                Ok(Copy::Upload {
                    sources: local,
                    runner,
                    dest: path,
                })
            }
            Location::Local(dest) => {
                let mut runners = Vec::new();
                let mut remote_paths = Vec::new();
                for source in sources {
                    match source {
                        Location::Remote { runner, path } => {
                            if !runners.contains(&runner) {
                                runners.push(runner);
                            }
                            remote_paths.push(path);
                        }
                        Location::Local(path) => {
                            return Err(usage(format!(
                                "neither {} nor {} is on a runner: write one side as RUNNER:PATH \
                                 (e.g. r1:code/); for local copies use cp",
                                path.display(),
                                dest.display()
                            )));
                        }
                    }
                }
                match runners.as_slice() {
                    [runner] => Ok(Copy::Download {
                        runner: runner.clone(),
                        sources: remote_paths,
                        dest,
                    }),
                    _ => Err(usage(format!(
                        "the sources are on several runners ({}); copy from one at a time",
                        runners.join(", ")
                    ))),
                }
            }
        }
    }

    fn runner(&self) -> &str {
        match self {
            Copy::Upload { runner, .. } | Copy::Download { runner, .. } => runner,
        }
    }
}

pub(super) async fn cp(context: &Context, args: CpArgs) -> anyhow::Result<()> {
    let copy = Copy::parse(&args.paths)?;
    if let Copy::Upload { sources, .. } = &copy {
        // Mistakes on this side are reported without a round trip.
        transfer::check_local_sources(sources, args.recursive)?;
    }
    let runner = copy.runner().to_owned();
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let identity = context.identity()?;
    let handle = ssh::connect(&client, &identity, &runner).await?;
    let sftp = Arc::new(ssh::sftp(&handle).await?);

    let plan = match &copy {
        Copy::Upload { sources, dest, .. } => {
            transfer::plan_upload(&sftp, &runner, sources, dest, args.recursive).await?
        }
        Copy::Download { sources, dest, .. } => {
            transfer::plan_download(&sftp, &runner, sources, dest, args.recursive).await?
        }
    };
    let bar = context.progress_bar(plan.total_bytes());
    let progress: transfer::Progress = {
        let bar = bar.clone();
        Arc::new(move |bytes| bar.inc(bytes))
    };
    let report = plan
        .execute(Arc::clone(&sftp), PARALLEL_FILES, progress)
        .await;
    bar.finish_and_clear();
    let report = report?;
    // Lets the server finish cleanly; the copy is already complete.
    let _ = sftp.close().await;

    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            let files = report.copied.len();
            writeln!(
                out,
                "copied {files} file{} ({})",
                if files == 1 { "" } else { "s" },
                HumanBytes(report.bytes)
            )?;
            for skipped in &report.skipped {
                eprintln!("skipped {skipped}");
            }
        }
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &output::Copied {
                copied: report.copied,
                bytes: report.bytes,
                skipped: report.skipped,
            },
        )?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(paths: &[&str]) -> Result<Copy, String> {
        let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
        Copy::parse(&paths).map_err(|failure| {
            assert_eq!(failure.code, Code::Usage);
            failure.message
        })
    }

    #[test]
    fn local_sources_to_a_runner_are_an_upload() {
        assert_eq!(
            parse(&["./data.csv", "./a:b", "r1:code/"]),
            Ok(Copy::Upload {
                sources: vec!["./data.csv".into(), "./a:b".into()],
                runner: "r1".into(),
                dest: "code/".into(),
            })
        );
    }

    #[test]
    fn runner_sources_to_a_local_path_are_a_download() {
        assert_eq!(
            parse(&["r1:outputs/plot.png", "r1.grad:/code", "."]),
            Ok(Copy::Download {
                runner: "r1".into(),
                sources: vec!["outputs/plot.png".into(), "/code".into()],
                dest: ".".into(),
            })
        );
    }

    #[test]
    fn copies_need_exactly_one_runner_side() {
        let error = parse(&["a.txt", "b.txt"]).expect_err("local only");
        assert!(error.contains("RUNNER:PATH"), "{error}");
        let error = parse(&["r1:a", "r2:b"]).expect_err("runner to runner");
        assert!(
            error.starts_with("cannot copy from r1:a to r2:b directly"),
            "{error}"
        );
        let error = parse(&["r1:a", "r2:b", "."]).expect_err("two runners");
        assert!(error.contains("several runners (r1, r2)"), "{error}");
        let error = parse(&["r1:a", "./b", "."]).expect_err("mixed");
        assert!(error.contains("./b"), "{error}");
    }
}

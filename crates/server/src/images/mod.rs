//! Where the daemon finds images: its images directory, then the cache the
//! set-up scripts build the default image into (`~/.cache/hatch/images`),
//! so that `hatch serve` on an empty data dir can create VMs at once.
//! Imported images are the cluster's (`cluster.rs`): recorded in the
//! database, stored in S3, and fetched by the nodes that need them.

mod cluster;

pub(crate) use cluster::{describe, image_error};

use hatch_image::{Image, ImageError, ImageStore, StagedImage};

/// Cheap to clone: directories and a shared lock.
#[derive(Clone)]
pub struct Images {
    primary: ImageStore,
    cache: Option<ImageStore>,
    /// Held while an image is fetched from S3 (one at a time: a herd of
    /// wakes of one image fetches it once).
    fetching: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Held for a whole import: two imports of one name on this node must
    /// not take each other's fresh copy for a stale one.
    importing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Images {
    pub fn new(primary: ImageStore, cache: Option<ImageStore>) -> Images {
        Images {
            primary,
            cache,
            fetching: Default::default(),
            importing: Default::default(),
        }
    }

    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        match self.primary.get(name) {
            Err(ImageError::NotFound(_)) if self.cache.is_some() => match &self.cache {
                Some(cache) => cache.get(name),
                None => Err(ImageError::NotFound(name.to_string())),
            },
            other => other,
        }
    }

    /// How to get image `name`, for the error of a create that names it.
    pub fn missing_hint(&self, name: &str) -> String {
        let dir = self.primary.root().display();
        if name == "default" {
            format!(
                "image 'default' is not built: run `hatch image build --images-dir {dir}` (`./scripts/up.sh` does it for you), then try again"
            )
        } else {
            format!(
                "unknown image '{name}': register it with `hatch image register {name} --kernel K --initrd I --disk D --images-dir {dir}`"
            )
        }
    }
}

impl Images {
    /// Every image this node can boot: its images directory's, then the
    /// cache's not shadowed by one of those.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut images = self.primary.list()?;
        if let Some(cache) = &self.cache {
            for image in cache.list()? {
                if !images.iter().any(|i| i.name == image.name) {
                    images.push(image);
                }
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// Import a container image archive as `name` (booted with the default
    /// image's kernel and initramfs).
    pub fn import(
        &self,
        name: &str,
        id: &str,
        archive: &std::path::Path,
    ) -> Result<Image, ImageError> {
        if self.get(name).is_ok() {
            return Err(ImageError::AlreadyExists(name.to_string()));
        }
        let base = self.get("default")?;
        self.primary.import(name, id, archive, &base)
    }

    /// Remove image `name` from the images directory (images in the cache
    /// are the set-up scripts' and stay).
    pub fn delete(&self, name: &str) -> Result<(), ImageError> {
        hatch_image::validate_image_name(name)?;
        if !self
            .primary
            .root()
            .join(name)
            .join(hatch_image::IMAGE_JSON)
            .is_file()
        {
            return Err(ImageError::NotFound(name.to_string()));
        }
        self.primary.remove(name)
    }

    /// This node's copy of an imported image (`id` set), if it has one.
    fn imported_copy(&self, name: &str) -> Option<Image> {
        self.primary.get(name).ok().filter(|i| i.id.is_some())
    }

    fn stage(&self, name: &str) -> Result<StagedImage, ImageError> {
        self.primary.stage(name)
    }

    fn install(&self, staged: StagedImage, image: Image) -> Result<Image, ImageError> {
        self.primary.install(staged, image)
    }

    /// Fetches and removals cut short by a crash: staging directories
    /// (`.fetch-NAME.tmp-PID-N`) of processes that are gone. The images
    /// directory may be shared with other daemons, whose work in progress
    /// is left alone.
    fn remove_partial_fetches(&self) {
        let Ok(entries) = std::fs::read_dir(self.primary.root()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(".fetch-") || name.starts_with(".removed-")) {
                continue;
            }
            let pid = name
                .rsplit_once(".tmp-")
                .and_then(|(_, rest)| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            let writer_alive =
                pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if !writer_alive {
                tracing::info!(dir = %e.path().display(), "removing an image fetch cut short");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Whether the images directory is under `dir` (this daemon's data
    /// dir), so that no other daemon keeps images in it.
    fn is_under(&self, dir: &std::path::Path) -> bool {
        std::path::absolute(dir).is_ok_and(|d| self.primary.root().starts_with(d))
    }

    /// Where uploads are staged (the images directory's file system, so the
    /// import does not copy across devices).
    pub fn staging_dir(&self) -> &std::path::Path {
        self.primary.root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_images_say_how_to_get_them() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::new(ImageStore::open(dir.path().join("a")).unwrap(), None);
        assert!(matches!(
            images.get("default"),
            Err(ImageError::NotFound(_))
        ));
        let hint = images.missing_hint("default");
        assert!(
            hint.contains("hatch image build --images-dir") && hint.contains("/a"),
            "{hint}"
        );
        assert!(
            images
                .missing_hint("web")
                .contains("hatch image register web")
        );
    }
}

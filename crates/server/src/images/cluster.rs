//! Imported images are the cluster's: the database records each (name, the
//! import's id, where its manifest is), S3 holds its files as chunks under
//! a sealed image manifest, and every node's images directory is a cache.
//! A node asked to boot or restore a VM of an image it lacks, or holds a
//! stale copy of (another import of the same name), fetches it first.
//!
//! Without S3 an import is recorded all the same, and only the importing
//! node has its files (other nodes say so clearly).

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use hatch_chunks::ChunkStore;
use hatch_image::{INITRD_FILE, Image, ImageError, KERNEL_FILE};
use hatch_snapshot::image_manifest::{
    IMAGE_MANIFEST_VERSION, ImageManifest, MAX_IMAGE_MANIFEST_BYTES, image_manifest_key,
};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::manager::{VmManager, new_id, now_rfc3339};
use crate::state::{ImageDeletion, ImageRecord};

/// An image a node cannot make available: S3 failed or holds something
/// else than what was imported.
fn unavailable(name: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(
        "image_unavailable",
        format!("image '{name}' cannot be fetched from snapshot storage: {why}"),
    )
}

pub(crate) fn image_error(e: ImageError) -> ApiError {
    match e {
        ImageError::InvalidInput(m) => ApiError::Invalid(m),
        e @ ImageError::InvalidName(_) => ApiError::Invalid(e.to_string()),
        ImageError::AlreadyExists(name) => {
            ApiError::conflict(format!("image '{name}' already exists"))
        }
        ImageError::NotFound(name) => ApiError::not_found("image", &name),
        other => ApiError::Internal(anyhow::Error::new(other)),
    }
}

/// What `GET /images` shows of an image this node has.
pub fn describe(image: &Image) -> Value {
    json!({
        "name": image.name,
        "kind": if image.app.is_some() { "container" } else { "vm" },
        "disk_mib": image.disk_mib,
        "created_at": image.created_at,
        "app": image.app,
    })
}

impl VmManager {
    /// Image `name`, ready to boot or restore on this node: an imported
    /// image this node lacks, or holds another import of, is fetched from
    /// S3 first. Unknown names are a 422 saying how to get the image.
    pub(crate) async fn image(&self, name: &str) -> Result<Image, ApiError> {
        let Some(record) = self.store.get_image(name).await? else {
            // Built or registered on this node. A copy of an import the
            // cluster no longer knows is stale (removed at the next start).
            return match self.images.get(name) {
                Ok(image) if image.id.is_none() => Ok(image),
                Ok(_) | Err(ImageError::NotFound(_)) => {
                    Err(ApiError::invalid(self.images.missing_hint(name)))
                }
                Err(e) => Err(ApiError::Internal(e.into())),
            };
        };
        let current = |images: &super::Images| {
            images
                .imported_copy(name)
                .filter(|i| i.id.as_deref() == Some(record.id.as_str()))
        };
        if let Some(image) = current(&self.images) {
            return Ok(image);
        }
        let _one_at_a_time = self.images.fetching.lock().await;
        if let Some(image) = current(&self.images) {
            return Ok(image);
        }
        self.fetch_image(&record).await
    }

    /// The guest ports image `name` exposes, from this node's copy or the
    /// cluster's record (a route may be made on a node without the image).
    pub(crate) async fn exposed_ports(&self, name: &str) -> Vec<u16> {
        if let Ok(image) = self.images.get(name) {
            return image.app.map(|a| a.exposed_ports).unwrap_or_default();
        }
        let Ok(Some(record)) = self.store.get_image(name).await else {
            return Vec::new();
        };
        serde_json::from_str::<Value>(&record.details)
            .ok()
            .and_then(|d| serde_json::from_value(d["app"]["exposed_ports"].clone()).ok())
            .unwrap_or_default()
    }

    async fn fetch_image(&self, record: &ImageRecord) -> Result<Image, ApiError> {
        let name = record.name.as_str();
        let Some(key) = &record.manifest else {
            return Err(ApiError::conflict(format!(
                "image '{name}' was imported on node '{}' without snapshot storage (S3), so only \
                 that node has it",
                record.node
            )));
        };
        let store = self.storage()?;
        let started = Instant::now();
        let bytes = store
            .get(key, MAX_IMAGE_MANIFEST_BYTES)
            .await
            .map_err(|e| unavailable(name, e))?;
        let m = ImageManifest::decode(&bytes, &self.seal_keys, name, &record.id)
            .map_err(|e| unavailable(name, format!("its manifest: {e}")))?;
        let staged = self.images.stage(name).map_err(image_error)?;
        let disk_file = hatch_image::disk_file_name(&m.disk_format).map_err(image_error)?;
        let (kernel, initrd, disk) = (
            staged.path(KERNEL_FILE),
            staged.path(INITRD_FILE),
            staged.path(&disk_file),
        );
        let fetched = futures_util::future::try_join3(
            store.download_file(&m.kernel, &kernel),
            store.download_file(&m.initrd, &initrd),
            store.download_file(&m.disk, &disk),
        )
        .await
        .map_err(|e| unavailable(name, e))?;
        self.faults
            .hit("image.fetched", name)
            .map_err(|e| unavailable(name, e))?;
        let image = Image {
            name: m.name,
            kernel,
            initrd,
            disk,
            disk_format: m.disk_format,
            disk_mib: m.disk_mib,
            cmdline: m.cmdline,
            created_at: m.created_at,
            agent: m.agent,
            app: m.app,
            id: Some(m.id),
        };
        let images = self.images.clone();
        let image = blocking(move || images.install(staged, image).map_err(image_error)).await?;
        let bytes = fetched.0.fetched_bytes + fetched.1.fetched_bytes + fetched.2.fetched_bytes;
        tracing::info!(
            image = %name,
            id = %record.id,
            fetched_bytes = bytes,
            ms = started.elapsed().as_millis() as u64,
            "fetched image from snapshot storage"
        );
        Ok(image)
    }

    /// Import a container image archive as `name`: unpacked into this
    /// node's images directory, uploaded to S3 (when configured) and
    /// recorded for the cluster. On any error nothing is left.
    pub(crate) async fn import_image(&self, name: &str, archive: &Path) -> Result<Image, ApiError> {
        hatch_image::validate_image_name(name).map_err(image_error)?;
        let _one_at_a_time = self.images.importing.lock().await;
        let taken = || ApiError::conflict(format!("image '{name}' already exists"));
        if self.store.get_image(name).await?.is_some() {
            return Err(taken());
        }
        if self.images.imported_copy(name).is_some() {
            // A copy of an import deleted since (on another node): stale.
            self.images.delete(name).map_err(image_error)?;
        }
        let id = new_id("img");
        let image = {
            let (name, id, archive) = (name.to_string(), id.clone(), archive.to_path_buf());
            let images = self.images.clone();
            blocking(move || images.import(&name, &id, &archive).map_err(image_error)).await?
        };
        let mut details = describe(&image);
        let manifest = match &self.storage {
            Some(store) => match self.upload_image(store, &image).await {
                Ok((key, stored)) => {
                    // What S3 holds because of it (chunks shared with
                    // earlier uploads are not counted again).
                    details["stored_bytes"] = json!(stored);
                    Some(key)
                }
                Err(e) => {
                    let _ = self.images.delete(name);
                    return Err(unavailable(name, format!("uploading it: {e:#}")));
                }
            },
            None => None,
        };
        let record = ImageRecord {
            name: name.to_string(),
            id,
            created_at: image.created_at.clone(),
            node: self.cfg.node_name.clone(),
            manifest: manifest.clone(),
            details: details.to_string(),
        };
        let inserted = self.store.insert_image(&record).await;
        if !matches!(inserted, Ok(true)) {
            // Taken meanwhile (by another node), or the database failed:
            // undo, the manifest's chunks are left to garbage collection.
            let _ = self.images.delete(name);
            if let (Some(store), Some(key)) = (&self.storage, &manifest) {
                self.delete_object(store, key).await;
            }
            inserted?;
            return Err(taken());
        }
        Ok(image)
    }

    /// Upload an imported image's files and then its manifest, under an
    /// upload lock (as a snapshot is: see `hatch_chunks::lock`).
    /// Answers the manifest's key and the bytes this upload added to S3.
    async fn upload_image(
        &self,
        store: &ChunkStore,
        image: &Image,
    ) -> anyhow::Result<(String, u64)> {
        let id = image.id.clone().unwrap_or_default();
        let _gc = self.gc_lock.read().await;
        let lock = store.lock_for_upload(&self.owner).await?;
        let started = Instant::now();
        let (kernel, k) = store.upload_file(&image.kernel).await?;
        let (initrd, i) = store.upload_file(&image.initrd).await?;
        let (disk, d) = store.upload_file(&image.disk).await?;
        self.faults.hit("image.uploaded", &image.name)?;
        let manifest = ImageManifest {
            version: IMAGE_MANIFEST_VERSION,
            name: image.name.clone(),
            id: id.clone(),
            created_at: image.created_at.clone(),
            disk_format: image.disk_format.clone(),
            disk_mib: image.disk_mib,
            cmdline: image.cmdline.clone(),
            agent: image.agent,
            app: image.app.clone(),
            kernel,
            initrd,
            disk,
        };
        let key = image_manifest_key(&image.name, &id);
        let bytes = manifest.encode(&self.seal_keys)?;
        let stored = k.stored_bytes + i.stored_bytes + d.stored_bytes + bytes.len() as u64;
        lock.check_held()?;
        store.put(&key, Bytes::from(bytes)).await?;
        lock.release().await;
        tracing::info!(
            image = %image.name,
            stored_bytes = stored,
            ms = started.elapsed().as_millis() as u64,
            "uploaded image to snapshot storage"
        );
        Ok((key, stored))
    }

    /// Every image: the cluster's imports (with whether this node has a
    /// current copy), then this node's built and registered ones.
    pub(crate) async fn list_images(&self) -> Result<Vec<Value>, ApiError> {
        let records = self.store.list_images().await?;
        let mut out = Vec::new();
        for r in &records {
            let mut v: Value = serde_json::from_str(&r.details).unwrap_or_else(|_| json!({}));
            let here = self
                .images
                .imported_copy(&r.name)
                .is_some_and(|i| i.id.as_deref() == Some(r.id.as_str()));
            v["name"] = json!(r.name);
            v["created_at"] = json!(r.created_at);
            v["node"] = json!(r.node);
            v["stored"] = json!(r.manifest.is_some());
            v["on_this_node"] = json!(here);
            out.push(v);
        }
        for image in self.images.list().map_err(image_error)? {
            if image.id.is_none() && !records.iter().any(|r| r.name == image.name) {
                let mut v = describe(&image);
                v["node"] = json!(self.cfg.node_name);
                v["stored"] = json!(false);
                v["on_this_node"] = json!(true);
                out.push(v);
            }
        }
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(out)
    }

    /// Delete image `name`: refused (409) while a VM of any node uses it.
    /// An import goes from the database, S3 and this node's directory;
    /// other nodes' copies are stale from then on and removed when they
    /// start.
    pub(crate) async fn delete_image(&self, name: &str) -> Result<(), ApiError> {
        hatch_image::validate_image_name(name).map_err(image_error)?;
        let record = self.store.get_image(name).await?;
        match self.store.delete_image(name, &now_rfc3339()).await? {
            ImageDeletion::InUse(users) => Err(in_use(name, &users)),
            ImageDeletion::Deleted => {
                self.images.delete(name).or_else(ignore_missing)?;
                // Queued with the record's deletion; done now if S3 answers.
                let key = record.and_then(|r| r.manifest);
                if let (Some(store), Some(key)) = (&self.storage, key) {
                    self.delete_object(store, &key).await;
                }
                Ok(())
            }
            ImageDeletion::NotFound => {
                // A built or registered image of this node.
                let users: Vec<String> = self
                    .store
                    .list_vms()
                    .await?
                    .into_iter()
                    .filter(|r| r.vm.image == name)
                    .map(|r| r.vm.id)
                    .collect();
                if !users.is_empty() {
                    return Err(in_use(name, &users));
                }
                self.images.delete(name).map_err(image_error)
            }
        }
    }

    /// At start-up: remove fetches cut short, and copies of imports the
    /// cluster no longer has (or has imported again under the same name);
    /// the latter only from an images directory of this daemon's own (one
    /// shared with daemons of another database holds their imports).
    pub(crate) async fn prune_images(&self) {
        self.images.remove_partial_fetches();
        if !self.images.is_under(&self.cfg.data_dir) {
            return;
        }
        let Ok(local) = self.images.list() else {
            return;
        };
        for image in local {
            let Some(id) = &image.id else { continue };
            let record = match self.store.get_image(&image.name).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the local images");
                    return;
                }
            };
            if record.is_none_or(|r| &r.id != id) {
                tracing::info!(image = %image.name, %id, "removing a stale copy of an image");
                let _ = self.images.delete(&image.name);
            }
        }
    }
}

fn in_use(name: &str, users: &[String]) -> ApiError {
    ApiError::conflict(format!(
        "image '{name}' is used by {}; delete those VMs first",
        users.join(", ")
    ))
}

fn ignore_missing(e: ImageError) -> Result<(), ApiError> {
    match e {
        ImageError::NotFound(_) => Ok(()),
        other => Err(image_error(other)),
    }
}

/// Run blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("an image task failed: {e}")))?
}

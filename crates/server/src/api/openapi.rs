//! The OpenAPI document served at `/openapi.json`, generated from the handlers
//! and the model types so that it cannot drift from them.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::model::{
    ApiKey, CreateApiKey, CreateRoute, CreateSnapshot, CreateVm, CreatedApiKey, EventList,
    LocalStorage, RestoreRequest, Retention, Route, Snapshot, SnapshotKind, SnapshotStatus,
    Storage, StorageUsage, UploadStatus, Vm, VmEvent, VmState, VmStorage,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Hatch API", description = "MicroVMs that sleep in S3 and wake on HTTP."),
    paths(
        super::vms::create, super::vms::list, super::vms::get, super::vms::delete,
        super::vms::start, super::vms::stop, super::vms::logs,
        super::vms::snapshot, super::vms::restore, super::vms::snapshots, super::vms::events,
        super::vms::get_snapshot, super::vms::delete_snapshot,
        super::vms::retention, super::vms::get_retention, super::vms::storage, super::vms::gc,
        super::routes::create, super::routes::list, super::routes::get, super::routes::delete,
        super::keys::list, super::keys::create, super::keys::revoke,
    ),
    components(schemas(Vm, VmState, VmEvent, EventList, CreateVm, Route, CreateRoute, Snapshot, SnapshotStatus,
        CreateSnapshot, RestoreRequest, Retention, Storage, StorageUsage, VmStorage,
        SnapshotKind, UploadStatus, LocalStorage, ApiKey, CreatedApiKey, CreateApiKey,
        crate::snapshot::gc::GcReport)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

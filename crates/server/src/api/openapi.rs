//! The OpenAPI document served at `/openapi.json`, generated from the handlers
//! and the model types so that it cannot drift from them.

use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Required, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};

use crate::model::{
    ApiKey, CreateApiKey, CreateRoute, CreateSnapshot, CreateVm, CreatedApiKey, EventList,
    LocalStorage, MoveRequest, Node, RestoreRequest, Retention, Route, Snapshot, SnapshotKind,
    SnapshotStatus, Storage, StorageUsage, UploadStatus, Vm, VmEvent, VmState, VmStorage,
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
        super::nodes::list, super::nodes::drain, super::nodes::undrain, super::vms::move_vm,
        super::images::list, super::images::import, super::images::delete,
        super::exec::exec, super::exec::exec_ws, super::exec::read_file, super::exec::write_file,
    ),
    components(schemas(Vm, VmState, VmEvent, EventList, CreateVm, Route, CreateRoute, Snapshot, SnapshotStatus,
        CreateSnapshot, RestoreRequest, Retention, Storage, StorageUsage, VmStorage,
        SnapshotKind, UploadStatus, LocalStorage, ApiKey, CreatedApiKey, CreateApiKey,
        crate::snapshot::gc::GcReport, Node, MoveRequest, crate::cluster::drain::DrainReport,
        ErrorBody, ErrorDetail, super::exec::ExecRequest, super::exec::ExecResult)),
    modifiers(&BearerAuth, &ErrorResponses),
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

/// What every operation can answer besides what its handler lists: 401
/// (all need a key), 500, 400 and 422 where a JSON body is read, 404 where
/// the path names something. Every error answer gets the error schema, and
/// every `{param}` of a path is declared.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let params: Vec<String> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_string)
                .collect();
            for op in [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                complete_operation(op, &params);
            }
        }
    }
}

fn complete_operation(op: &mut Operation, params: &[String]) {
    let mut add = vec![
        ("401", "missing or invalid API key (`unauthorized`)"),
        ("500", "internal error (`internal`)"),
    ];
    if op.request_body.is_some() {
        add.push(("400", "the body is not JSON (`bad_request`)"));
        add.push(("422", "invalid values (`invalid`)"));
    }
    if !params.is_empty() {
        add.push(("404", "no such resource (`not_found`)"));
    }
    for (status, description) in add {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .build()
                    .into()
            });
    }
    for (status, response) in op.responses.responses.iter_mut() {
        if !status.starts_with('4') && !status.starts_with('5') {
            continue;
        }
        if let RefOr::T(response) = response {
            if response.description.is_empty() {
                response.description = "error".into();
            }
            response.content.insert(
                "application/json".into(),
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            );
        }
    }
    let declared: Vec<String> = op
        .parameters
        .iter()
        .flatten()
        .filter(|p| p.parameter_in == ParameterIn::Path)
        .map(|p| p.name.clone())
        .collect();
    for name in params.iter().filter(|n| !declared.contains(n)) {
        let description = match name.as_str() {
            "id" => "id (or, for VMs, name; for routes, host name)",
            "sid" => "snapshot id",
            _ => "identifier",
        };
        let param: Parameter = ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some(description))
            .schema(Some(utoipa::openapi::schema::Object::with_type(
                utoipa::openapi::schema::Type::String,
            )))
            .build();
        op.parameters.get_or_insert_with(Vec::new).push(param);
    }
}

//! The Cedar engine: the compiled-in schema's entity types and actions, parsing and
//! validating one policy file, and evaluating one request against a policy set.
//!
//! Owns: building the request's entities (principal, action, resource and its parents,
//! context) and the decision's reason text. Does not: read the policy directory,
//! cache decisions, or reload (the authorizer in `authz.rs` does).

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::str::FromStr;

use cedar_policy as cedar;
use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};

use super::{Action, AuthzRequest, Decision, SCHEMA, SERVICE_ID};

/// The immutable part: the schema's entity types and actions, the Cedar evaluator.
pub(super) struct Engine {
    evaluator: cedar::Authorizer,
    validator: Validator,
    identity_type: EntityTypeName,
    tenant_type: EntityTypeName,
    field_type: EntityTypeName,
    service: Entity,
    service_uid: EntityUid,
    /// Per [`Action::index`]: the action's uid and entity (with its group as parent).
    actions: Vec<(EntityUid, Entity)>,
}

fn type_name(name: &str) -> Result<EntityTypeName, String> {
    EntityTypeName::from_str(name).map_err(|e| format!("entity type {name}: {e}"))
}

impl Engine {
    pub(super) fn new() -> Result<Self, String> {
        let (schema, warnings) = Schema::from_cedarschema_str(SCHEMA).map_err(|e| e.to_string())?;
        for w in warnings {
            tracing::warn!(warning = %w, "authorization schema");
        }
        let action_type = type_name("Action")?;
        let groups = ["Crypto", "Keys", "Jobs", "Erasures", "Audit"];
        let declared = schema.action_entities().map_err(|e| e.to_string())?;
        for e in declared.iter() {
            let uid = e.uid();
            let id = uid.id().unescaped();
            if Action::parse(id).is_none() && !groups.contains(&id) {
                return Err(format!("schema declares action {id} that the code lacks"));
            }
        }
        let mut actions = Vec::with_capacity(Action::ALL.len());
        for a in Action::ALL {
            let uid =
                EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a.as_str()));
            let entity = declared
                .get(&uid)
                .cloned()
                .ok_or_else(|| format!("schema lacks action {a}"))?;
            actions.push((uid, entity));
        }
        let service_uid =
            EntityUid::from_type_name_and_id(type_name("Service")?, EntityId::new(SERVICE_ID));
        Ok(Self {
            evaluator: cedar::Authorizer::new(),
            validator: Validator::new(schema),
            identity_type: type_name("Identity")?,
            tenant_type: type_name("Tenant")?,
            field_type: type_name("Field")?,
            service: Entity::new_no_attrs(service_uid.clone(), HashSet::new()),
            service_uid,
            actions,
        })
    }

    /// Parses and validates one policy file into `into`, naming its policies
    /// `<file>:<@id>` (or `<file>:policy<N>`, N counting from 0, without `@id`).
    pub(super) fn add_file(
        &self,
        name: &str,
        text: &str,
        into: &mut PolicySet,
    ) -> Result<usize, String> {
        let parsed = PolicySet::from_str(text).map_err(|e| {
            let all: Vec<String> = e.iter().map(ToString::to_string).collect();
            match first_bad_statement(text) {
                Some(line) => format!("syntax (policy from line {line}): {}", all.join("; ")),
                None => format!("syntax: {}", all.join("; ")),
            }
        })?;
        if parsed.templates().next().is_some() {
            return Err(
                "templates (policies with ?principal or ?resource) are not supported".into(),
            );
        }
        let mut renamed = PolicySet::new();
        for p in parsed.policies() {
            let local = p
                .annotation("id")
                .map_or_else(|| p.id().to_string(), str::to_owned);
            let id = PolicyId::new(format!("{name}:{local}"));
            renamed
                .add(p.new_id(id))
                .map_err(|_| format!("two policies have @id(\"{local}\")"))?;
        }
        let result = self.validator.validate(&renamed, ValidationMode::Strict);
        if !result.validation_passed() {
            let all: Vec<String> = result
                .validation_errors()
                .map(ToString::to_string)
                .collect();
            return Err(format!("does not match the schema: {}", all.join("; ")));
        }
        for w in result.validation_warnings() {
            tracing::warn!(file = name, warning = %w, "authorization policy");
        }
        let mut n = 0;
        for p in renamed.policies() {
            into.add(p.clone()).map_err(|e| e.to_string())?;
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn evaluate(&self, policies: &PolicySet, req: &AuthzRequest<'_>) -> Decision {
        match self.try_evaluate(policies, req) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(
                    identity = %req.identity.escape_debug(),
                    action = req.action.as_str(),
                    error = %e,
                    "authorization could not be evaluated; denied"
                );
                Decision {
                    allowed: false,
                    reason: format!(
                        "authorization failed for {} on {} for {}: {e}",
                        req.action,
                        ResourceName(req),
                        req.identity.escape_debug()
                    )
                    .into(),
                }
            }
        }
    }

    fn try_evaluate(
        &self,
        policies: &PolicySet,
        req: &AuthzRequest<'_>,
    ) -> Result<Decision, String> {
        let (action_uid, action_entity) = self
            .actions
            .get(req.action.index())
            .ok_or("unknown action")?;
        let mut entities = Vec::with_capacity(4);
        entities.push(action_entity.clone());
        entities.push(self.service.clone());
        let resource = match req.tenant {
            None => self.service_uid.clone(),
            Some(tenant) => {
                let tenant_uid = EntityUid::from_type_name_and_id(
                    self.tenant_type.clone(),
                    EntityId::new(tenant),
                );
                entities.push(Entity::new_no_attrs(
                    tenant_uid.clone(),
                    HashSet::from([self.service_uid.clone()]),
                ));
                match req.field {
                    None => tenant_uid,
                    Some(field) => {
                        let field_uid = EntityUid::from_type_name_and_id(
                            self.field_type.clone(),
                            EntityId::new(format!("{tenant}/{field}")),
                        );
                        let attrs = HashMap::from([
                            (
                                "tenant".to_owned(),
                                RestrictedExpression::new_string(tenant.to_owned()),
                            ),
                            (
                                "name".to_owned(),
                                RestrictedExpression::new_string(field.to_owned()),
                            ),
                        ]);
                        entities.push(
                            Entity::new(field_uid.clone(), attrs, HashSet::from([tenant_uid]))
                                .map_err(|e| e.to_string())?,
                        );
                        field_uid
                    }
                }
            }
        };
        let principal = EntityUid::from_type_name_and_id(
            self.identity_type.clone(),
            EntityId::new(req.identity),
        );
        let context = Context::from_pairs([(
            "transport".to_owned(),
            RestrictedExpression::new_string(req.transport.to_owned()),
        )])
        .map_err(|e| e.to_string())?;
        let request = Request::new(principal, action_uid.clone(), resource, context, None)
            .map_err(|e| e.to_string())?;
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        let response = self.evaluator.is_authorized(&request, policies, &entities);
        for e in response.diagnostics().errors() {
            tracing::warn!(error = %e, "authorization policy failed to evaluate (skipped)");
        }
        let mut ids: Vec<&str> = response.diagnostics().reason().map(AsRef::as_ref).collect();
        ids.sort_unstable();
        let ids = ids.join(", ");
        let allowed = response.decision() == cedar::Decision::Allow;
        let mut reason = String::new();
        if allowed {
            let _ = write!(reason, "permitted by policy {ids}");
        } else {
            if ids.is_empty() {
                reason.push_str("no policy permits ");
            } else {
                let _ = write!(reason, "forbidden by policy {ids}: ");
            }
            let _ = write!(
                reason,
                "{} on {} for {}",
                req.action,
                ResourceName(req),
                req.identity.escape_debug()
            );
        }
        Ok(Decision {
            allowed,
            reason: reason.into(),
        })
    }
}

/// The line (from 1) where the first statement that does not parse on its own starts.
/// Cedar's messages carry the position only as a `miette` label; statements are
/// delimited by `;` outside strings and comments, so they can be tried one by one.
pub(super) fn first_bad_statement(text: &str) -> Option<usize> {
    let mut start = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut in_comment = false;
    let mut prev = '\0';
    for (i, c) in text.char_indices() {
        if in_comment {
            in_comment = c != '\n';
        } else if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if c == '/' && prev == '/' {
            in_comment = true;
        } else if c == ';' {
            let end = i + c.len_utf8();
            let stmt = text.get(start..end)?;
            if PolicySet::from_str(stmt).is_err() {
                break;
            }
            start = end;
        }
        prev = if in_comment { '\0' } else { c };
    }
    // Skip the whitespace and comment lines before the statement.
    let mut rest = text.get(start..)?;
    loop {
        let trimmed = rest.trim_start();
        match trimmed.strip_prefix("//") {
            Some(comment) => rest = comment.split_once('\n').map_or("", |(_, after)| after),
            None => {
                rest = trimmed;
                break;
            }
        }
    }
    let offset = text.len() - rest.len();
    Some(text.get(..offset)?.matches('\n').count() + 1)
}

/// Displays the resource of a request: "field acme/email", "tenant acme", "service fieldkey".
struct ResourceName<'r, 'a>(&'r AuthzRequest<'a>);

impl fmt::Display for ResourceName<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.tenant, self.0.field) {
            (Some(t), Some(fd)) => write!(f, "field {}/{}", t.escape_debug(), fd.escape_debug()),
            (Some(t), None) => write!(f, "tenant {}", t.escape_debug()),
            (None, _) => write!(f, "service {SERVICE_ID}"),
        }
    }
}

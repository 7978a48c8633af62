//! Typed per-event tables: for each track event with a schema, a table with the common columns
//! plus one column per declared property, at `tracks/<event_slug>/date=YYYY-MM-DD/`.
//!
//! The Arrow schema comes from the JSON Schemas of every version of the event: properties of all
//! versions (so a property added in a later version is a new column, null in older rows), each
//! typed by the newest version that declares it:
//!
//! | JSON Schema | column |
//! |---|---|
//! | `string` (`format: date-time`) | `Utf8` (`Timestamp(µs, UTC)`) |
//! | `integer` / `number` / `boolean` | `Int64` / `Float64` / `Boolean` |
//! | `object` with `properties` | flattened: one column per leaf, named `parent_child` |
//! | `array` of a scalar type | `List` of that type |
//! | anything else (`object` without properties, mixed types, `anyOf`, ...) | `Utf8`, the value as JSON text |
//!
//! A value of the wrong type (the message was flagged, not blocked) becomes null in its column;
//! the raw value is always in `events.properties`.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;

use crate::entry::Entry;
use crate::schema::live::Snapshot;
use crate::schema::{Live, SchemaFile, Schemas};
use crate::vocabulary::parse_time;

/// The typed tables, by track event name.
pub type TypedTables = std::collections::HashMap<String, TypedTable>;

/// Builds the typed tables of every track event with a schema.
pub fn typed_tables(schemas: &Schemas) -> TypedTables {
    schemas
        .tracks()
        .map(|(event, versions)| (event.to_string(), TypedTable::new(event, versions)))
        .collect()
}

/// The typed tables in force: they follow the schema registry as it reloads, rebuilt only when
/// it changed.
pub struct TypedSource {
    live: Arc<Live>,
    cache: std::sync::Mutex<Option<(Arc<Snapshot>, Arc<TypedTables>)>>,
}

impl TypedSource {
    pub fn new(live: Arc<Live>) -> Self {
        TypedSource {
            live,
            cache: std::sync::Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<TypedTables> {
        let snapshot = self.live.snapshot();
        let mut cache = self.cache.lock().unwrap();
        match cache.as_ref() {
            Some((seen, tables)) if Arc::ptr_eq(seen, &snapshot) => tables.clone(),
            _ => {
                let tables = Arc::new(typed_tables(&snapshot.schemas));
                *cache = Some((snapshot, tables.clone()));
                tables
            }
        }
    }
}

impl Default for TypedSource {
    /// No schemas: no typed tables.
    fn default() -> Self {
        TypedSource::new(Arc::new(Live::empty()))
    }
}

/// The folder and SQL name of an event's table: lower case, runs of other characters as `_`.
pub fn slug(event: &str) -> String {
    let mut out = String::with_capacity(event.len());
    let mut gap = false;
    for c in event.chars() {
        if c.is_ascii_alphanumeric() {
            if gap && !out.is_empty() {
                out.push('_');
            }
            gap = false;
            out.push(c.to_ascii_lowercase());
        } else {
            gap = true;
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The type of one column derived from a property.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Text,
    Timestamp,
    Integer,
    Number,
    Boolean,
    List(Box<Kind>),
    /// Any JSON, stored as its text.
    Json,
}

impl Kind {
    fn data_type(&self) -> DataType {
        match self {
            Kind::Text | Kind::Json => DataType::Utf8,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Kind::Integer => DataType::Int64,
            Kind::Number => DataType::Float64,
            Kind::Boolean => DataType::Boolean,
            Kind::List(item) => {
                DataType::List(Arc::new(Field::new("item", item.data_type(), true)))
            }
        }
    }
}

/// One property column: where its value is in `properties`, and its type.
#[derive(Debug, Clone, PartialEq)]
struct Column {
    name: String,
    path: Vec<String>,
    kind: Kind,
}

/// The columns every typed table starts with.
const COMMON: [&str; 6] = [
    "message_id",
    "user_id",
    "anonymous_id",
    "source",
    "timestamp",
    "received_at",
];

/// An event's typed table.
#[derive(Debug, Clone)]
pub struct TypedTable {
    pub event: String,
    pub slug: String,
    pub schema: SchemaRef,
    columns: Vec<Column>,
}

impl TypedTable {
    /// The table for `event` from its schema versions (oldest first).
    pub fn new(event: &str, versions: &[SchemaFile]) -> TypedTable {
        // Oldest first, so that newer versions overwrite the types of the properties they keep.
        let mut by_path: BTreeMap<Vec<String>, Kind> = BTreeMap::new();
        let mut order: Vec<Vec<String>> = Vec::new();
        for version in versions {
            let mut found = Vec::new();
            leaves(&version.schema, &mut Vec::new(), &mut found);
            for (path, kind) in found {
                if !by_path.contains_key(&path) {
                    order.push(path.clone());
                }
                by_path.insert(path, kind);
            }
        }
        let mut fields = vec![
            Field::new("message_id", DataType::Utf8, false),
            Field::new("user_id", DataType::Utf8, true),
            Field::new("anonymous_id", DataType::Utf8, true),
            Field::new("source", DataType::Utf8, false),
            Field::new("timestamp", Kind::Timestamp.data_type(), false),
            Field::new("received_at", Kind::Timestamp.data_type(), false),
        ];
        let mut columns = Vec::new();
        let mut taken: Vec<String> = COMMON.iter().map(|c| c.to_string()).collect();
        for path in order {
            let kind = by_path[&path].clone();
            let mut name = path.join("_");
            if taken.contains(&name) {
                name = format!("property_{name}");
            }
            taken.push(name.clone());
            fields.push(Field::new(&name, kind.data_type(), true));
            columns.push(Column { name, path, kind });
        }
        TypedTable {
            event: event.to_string(),
            slug: slug(event),
            schema: Arc::new(Schema::new(fields)),
            columns,
        }
    }

    /// Where the table's files go, under the lake.
    pub fn folder(&self) -> String {
        format!("tracks/{}", self.slug)
    }

    pub fn builder(&self) -> TypedBuilder {
        TypedBuilder {
            table: self.clone(),
            message_id: StringBuilder::new(),
            user_id: StringBuilder::new(),
            anonymous_id: StringBuilder::new(),
            source: StringBuilder::new(),
            timestamp: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            received_at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            columns: self.columns.iter().map(|c| builder_for(&c.kind)).collect(),
            rows: 0,
        }
    }
}

/// The leaf properties of a JSON Schema object, with their paths.
fn leaves(schema: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, Kind)>) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, property) in properties {
        path.push(name.clone());
        if type_of(property) == Some("object") && property.get("properties").is_some() {
            leaves(property, path, out);
        } else {
            out.push((path.clone(), kind_of(property)));
        }
        path.pop();
    }
}

/// The one non-null type a property declares, if it declares exactly one.
fn type_of(property: &Value) -> Option<&str> {
    match property.get("type")? {
        Value::String(t) => Some(t.as_str()),
        Value::Array(types) => {
            let named: Vec<&str> = types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            (named.len() == 1).then(|| named[0])
        }
        _ => None,
    }
}

fn kind_of(property: &Value) -> Kind {
    match type_of(property) {
        Some("string") if property.get("format").and_then(Value::as_str) == Some("date-time") => {
            Kind::Timestamp
        }
        Some("string") => Kind::Text,
        Some("integer") => Kind::Integer,
        Some("number") => Kind::Number,
        Some("boolean") => Kind::Boolean,
        Some("array") => match property.get("items").map(kind_of) {
            Some(
                item
                @ (Kind::Text | Kind::Timestamp | Kind::Integer | Kind::Number | Kind::Boolean),
            ) => Kind::List(Box::new(item)),
            _ => Kind::List(Box::new(Kind::Json)),
        },
        _ => Kind::Json,
    }
}

fn builder_for(kind: &Kind) -> Box<dyn ArrayBuilder> {
    match kind {
        Kind::Text | Kind::Json => Box::new(StringBuilder::new()),
        Kind::Timestamp => Box::new(TimestampMicrosecondBuilder::new().with_timezone("UTC")),
        Kind::Integer => Box::new(Int64Builder::new()),
        Kind::Number => Box::new(Float64Builder::new()),
        Kind::Boolean => Box::new(BooleanBuilder::new()),
        Kind::List(item) => match item.as_ref() {
            Kind::Integer => Box::new(ListBuilder::new(Int64Builder::new())),
            Kind::Number => Box::new(ListBuilder::new(Float64Builder::new())),
            Kind::Boolean => Box::new(ListBuilder::new(BooleanBuilder::new())),
            Kind::Timestamp => Box::new(ListBuilder::new(
                TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            )),
            _ => Box::new(ListBuilder::new(StringBuilder::new())),
        },
    }
}

fn downcast<T: 'static>(b: &mut Box<dyn ArrayBuilder>) -> &mut T {
    b.as_any_mut()
        .downcast_mut::<T>()
        .expect("builder made by builder_for for this kind")
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Appends `value` (absent = null) to a builder of `kind`; a value of another type is null.
fn append(builder: &mut Box<dyn ArrayBuilder>, kind: &Kind, value: Option<&Value>) {
    let value = value.filter(|v| !v.is_null());
    match kind {
        Kind::Text => {
            downcast::<StringBuilder>(builder).append_option(value.and_then(Value::as_str))
        }
        Kind::Json => downcast::<StringBuilder>(builder).append_option(value.map(json_text)),
        Kind::Timestamp => downcast::<TimestampMicrosecondBuilder>(builder).append_option(
            value
                .and_then(Value::as_str)
                .and_then(parse_time)
                .map(|t| t.timestamp_micros()),
        ),
        Kind::Integer => {
            downcast::<Int64Builder>(builder).append_option(value.and_then(Value::as_i64))
        }
        Kind::Number => {
            downcast::<Float64Builder>(builder).append_option(value.and_then(Value::as_f64))
        }
        Kind::Boolean => {
            downcast::<BooleanBuilder>(builder).append_option(value.and_then(Value::as_bool))
        }
        Kind::List(item) => {
            let items = value.and_then(Value::as_array);
            macro_rules! list {
                ($b:ty, $conv:expr) => {{
                    let list = downcast::<ListBuilder<$b>>(builder);
                    match items {
                        Some(items) => {
                            for v in items {
                                list.values().append_option($conv(v));
                            }
                            list.append(true);
                        }
                        None => list.append(false),
                    }
                }};
            }
            match item.as_ref() {
                Kind::Integer => list!(Int64Builder, Value::as_i64),
                Kind::Number => list!(Float64Builder, Value::as_f64),
                Kind::Boolean => list!(BooleanBuilder, Value::as_bool),
                Kind::Timestamp => list!(TimestampMicrosecondBuilder, |v: &Value| v
                    .as_str()
                    .and_then(parse_time)
                    .map(|t| t.timestamp_micros())),
                Kind::Text => list!(StringBuilder, |v: &Value| v.as_str().map(str::to_string)),
                _ => list!(StringBuilder, |v: &Value| Some(json_text(v))),
            }
        }
    }
}

/// Rows of one typed table.
pub struct TypedBuilder {
    table: TypedTable,
    message_id: StringBuilder,
    user_id: StringBuilder,
    anonymous_id: StringBuilder,
    source: StringBuilder,
    timestamp: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    columns: Vec<Box<dyn ArrayBuilder>>,
    rows: usize,
}

/// The parts of a stored track that a typed row needs.
#[derive(serde::Deserialize)]
struct Track {
    #[serde(rename = "messageId")]
    message_id: String,
    #[serde(rename = "userId")]
    user_id: Option<String>,
    #[serde(rename = "anonymousId")]
    anonymous_id: Option<String>,
    timestamp: String,
    #[serde(default)]
    properties: Value,
}

impl TypedBuilder {
    /// Adds an accepted track of this table's event.
    pub fn append(&mut self, entry: &Entry) -> Result<(), String> {
        let track: Track = serde_json::from_slice(entry.body).map_err(|e| e.to_string())?;
        let timestamp = parse_time(&track.timestamp).ok_or("`timestamp` is not a date")?;
        self.message_id.append_value(&track.message_id);
        self.user_id.append_option(track.user_id);
        self.anonymous_id.append_option(track.anonymous_id);
        self.source.append_value(entry.source);
        self.timestamp.append_value(timestamp.timestamp_micros());
        self.received_at.append_value(entry.received_at_micros);
        for (column, builder) in self.table.columns.iter().zip(&mut self.columns) {
            let value = column
                .path
                .iter()
                .try_fold(&track.properties, |v, key| v.get(key));
            append(builder, &column.kind, value);
        }
        self.rows += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.message_id.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.anonymous_id.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.received_at.finish()),
        ];
        arrays.extend(self.columns.iter_mut().map(|b| b.finish()));
        RecordBatch::try_new(self.table.schema.clone(), arrays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Status;
    use crate::vocabulary::MessageType;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Float64Type, Int64Type};

    fn version(v: u64, schema: Value) -> SchemaFile {
        SchemaFile {
            path: format!("v{v}.json").into(),
            text: String::new(),
            kind: MessageType::Track,
            event: Some("Order Completed".into()),
            version: v,
            schema,
        }
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Order Completed"), "order_completed");
        assert_eq!(slug("  Signed-Up!! (v2) "), "signed_up_v2");
        assert_eq!(slug("Ünïcode"), "n_code");
        assert_eq!(slug("!!!"), "_");
    }

    fn order_schemas() -> Vec<SchemaFile> {
        vec![
            version(
                1,
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "order_id": {"type": "string"},
                        "revenue": {"type": "number"},
                        "shipping": {"type": "object", "properties": {"method": {"type": "string"}, "days": {"type": "integer"}}},
                        "coupon": {"type": "integer"}
                    }
                }),
            ),
            version(
                2,
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "order_id": {"type": "string"},
                        "revenue": {"type": "number"},
                        "coupon": {"type": ["string", "null"]},
                        "skus": {"type": "array", "items": {"type": "string"}},
                        "placed_at": {"type": "string", "format": "date-time"},
                        "gift": {"type": "boolean"},
                        "extra": {"type": "object"},
                        "timestamp": {"type": "string"}
                    }
                }),
            ),
        ]
    }

    #[test]
    fn columns_follow_every_version_flattened_and_typed_by_the_newest() {
        let table = TypedTable::new("Order Completed", &order_schemas());
        let fields: Vec<(String, DataType)> = table
            .schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "message_id",
                "user_id",
                "anonymous_id",
                "source",
                "timestamp",
                "received_at",
                "coupon",
                "order_id",
                "revenue",
                "shipping_days",
                "shipping_method",
                "extra",
                "gift",
                "placed_at",
                "skus",
                "property_timestamp",
            ]
        );
        let type_of = |n: &str| fields.iter().find(|(f, _)| f == n).unwrap().1.clone();
        assert_eq!(type_of("coupon"), DataType::Utf8, "v2 made it a string");
        assert_eq!(type_of("shipping_days"), DataType::Int64);
        assert_eq!(type_of("revenue"), DataType::Float64);
        assert!(matches!(type_of("skus"), DataType::List(_)));
        assert!(matches!(type_of("placed_at"), DataType::Timestamp(..)));
        assert_eq!(table.folder(), "tracks/order_completed");
    }

    #[test]
    fn rows_take_values_by_path_and_null_what_does_not_fit() {
        let table = TypedTable::new("Order Completed", &order_schemas());
        let mut b = table.builder();
        let body = r#"{"type":"track","messageId":"m1","userId":"u","event":"Order Completed","timestamp":"2026-01-01T00:00:00Z",
            "properties":{"order_id":"o1","revenue":"not a number","shipping":{"days":3},"skus":["a","b"],
                          "placed_at":"2026-01-01T00:00:00Z","extra":{"k":[1]},"coupon":"WINTER","timestamp":"x"}}"#;
        let mut bytes = Vec::new();
        Entry::encode(
            &mut bytes,
            Status::Accepted,
            chrono::Utc::now(),
            "web",
            "m1",
            "",
            |o| o.extend_from_slice(body.as_bytes()),
        );
        b.append(&Entry::decode(&bytes).unwrap()).unwrap();
        let batch = b.finish().unwrap();
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        assert_eq!(col("order_id").as_string::<i32>().value(0), "o1");
        assert!(
            col("revenue").is_null(0),
            "a string where a number belongs is null"
        );
        assert_eq!(col("revenue").as_primitive::<Float64Type>().len(), 1);
        assert_eq!(col("shipping_days").as_primitive::<Int64Type>().value(0), 3);
        assert!(col("shipping_method").is_null(0));
        assert_eq!(col("extra").as_string::<i32>().value(0), r#"{"k":[1]}"#);
        assert_eq!(col("property_timestamp").as_string::<i32>().value(0), "x");
        let skus = col("skus");
        let list = skus.as_list::<i32>();
        assert_eq!(
            list.value(0)
                .as_string::<i32>()
                .iter()
                .flatten()
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert!(col("gift").is_null(0));
    }
}

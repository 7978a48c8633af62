use super::*;
use crate::lake::tests::{append, fixture, flush_all, rejected, track, writer};

async fn lake_with_data() -> crate::lake::tests::Fixture {
    let f = fixture(LakeStore::in_memory());
    append(
        &f.log,
        &[
            track("a", "Signed Up", "2026-03-01T10:00:00Z"),
            track("b", "Signed Up", "2026-03-01T11:00:00Z"),
            track("c", "Order Completed", "2026-03-02T10:00:00Z"),
            rejected("r", "2026-03-02T10:00:01Z"),
        ],
    )
    .await;
    let mut w = writer(&f);
    tokio::task::block_in_place(|| flush_all(&f, &mut w));
    f
}

fn text(result: &QueryResult, format: Format) -> String {
    let mut out = Vec::new();
    write(result, format, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_by_event_with_partition_filter_and_json_functions() {
    let f = lake_with_data().await;
    let engine = QueryEngine::new(f.store.clone(), Default::default(), QueryLimits::default());
    let r = engine
        .sql("SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY event")
        .await
        .unwrap();
    assert_eq!(
        text(&r, Format::Json),
        "{\"event\":\"Order Completed\",\"n\":1}\n{\"event\":\"Signed Up\",\"n\":2}\n"
    );
    let r = engine
        .sql("SELECT message_id FROM events WHERE date = '2026-03-02'")
        .await
        .unwrap();
    assert_eq!(text(&r, Format::Csv), "message_id\nc\n");
    let r = engine
        .sql("SELECT json_get_str(properties, 'plan') AS plan, sum(json_get_float(properties, 'revenue')) AS revenue FROM events GROUP BY 1")
        .await
        .unwrap();
    assert_eq!(
        text(&r, Format::Json),
        "{\"plan\":\"pro\",\"revenue\":37.5}\n"
    );
    let r = engine
        .sql("SELECT reason, raw FROM quarantine")
        .await
        .unwrap();
    let rows = to_json_rows(&r).unwrap();
    assert_eq!(rows[0]["reason"], "track needs `event`");
    let table = text(
        &engine
            .sql("SELECT count(*) AS n FROM events")
            .await
            .unwrap(),
        Format::Table,
    );
    assert!(
        table.contains("| 3 |") && table.ends_with("1 row\n"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_is_invalid_not_a_crash() {
    let f = lake_with_data().await;
    let engine = QueryEngine::new(f.store.clone(), Default::default(), QueryLimits::default());
    for sql in [
        "SELEC 1",
        "SELECT nope FROM events",
        "SELECT * FROM missing_table",
    ] {
        match engine.sql(sql).await {
            Err(QueryError::Invalid(message)) => assert!(!message.is_empty()),
            Err(other) => panic!("{sql}: {other:?}"),
            Ok(_) => panic!("{sql} ran"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_lake_answers_with_no_rows() {
    let f = fixture(LakeStore::in_memory());
    let engine = QueryEngine::new(f.store.clone(), Default::default(), QueryLimits::default());
    let r = engine
        .sql("SELECT count(*) AS n FROM events")
        .await
        .unwrap();
    assert_eq!(text(&r, Format::Json), "{\"n\":0}\n");
    let r = engine.sql("SELECT * FROM quarantine").await.unwrap();
    assert_eq!(r.rows(), 0);
    assert!(text(&r, Format::Csv).starts_with("received_at,source,message_id"));
    // A table with its columns and no rows, not an empty frame.
    let table = text(&r, Format::Table);
    assert!(
        table.contains("| received_at")
            && table.contains("| source")
            && table.ends_with("0 rows\n"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_track_tables_are_queryable_by_slug() {
    use crate::lake::typed::{TypedSource, TypedTable, TypedTables};
    use crate::lake::writer::Flush;
    use crate::schema::{Live, Registry, SchemaFile, Schemas};
    use crate::vocabulary::MessageType;

    let schema = SchemaFile {
        path: "signed_up.json".into(),
        text: String::new(),
        kind: MessageType::Track,
        event: Some("Signed Up".into()),
        version: 1,
        schema: serde_json::json!({"type": "object", "properties": {
            "plan": {"type": "string"}, "revenue": {"type": "number"}, "seats": {"type": "integer"}}}),
    };
    let table = TypedTable::new("Signed Up", std::slice::from_ref(&schema));
    let (schemas, _) = Schemas::from_files([schema]);
    let (registry, _) = Registry::build(&schemas);
    let source = std::sync::Arc::new(TypedSource::new(std::sync::Arc::new(Live::new(
        schemas, registry,
    ))));
    let typed: TypedTables = [("Signed Up".to_string(), table.clone())].into();
    let f = fixture(LakeStore::in_memory());
    append(
        &f.log,
        &[
            track("a", "Signed Up", "2026-03-01T10:00:00Z"),
            track("b", "Other Event", "2026-03-01T10:00:01Z"),
        ],
    )
    .await;
    let mut w = writer(&f);
    let mut flush = Flush::new(0, std::sync::Arc::new(typed));
    for r in f.log.reader(0).read(10).unwrap() {
        flush.add(&r).unwrap();
    }
    tokio::task::block_in_place(|| w.write(&flush.finish().unwrap())).unwrap();
    assert!(crate::lake::tests::files(&f.store).await.contains(
        &"tracks/signed_up/date=2026-03-01/00000000000000000000-00000000000000000002.parquet"
            .to_string()
    ));
    let engine = QueryEngine::new(f.store.clone(), source, QueryLimits::default());
    let r = engine
        .sql("SELECT message_id, plan, revenue, seats, date FROM tracks.signed_up")
        .await
        .unwrap();
    assert_eq!(
        text(&r, Format::Json),
        "{\"message_id\":\"a\",\"plan\":\"pro\",\"revenue\":12.5,\"date\":\"2026-03-01\"}\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_date_filter_reads_only_its_partitions() {
    use object_store::ObjectStoreExt;
    let f = lake_with_data().await;
    // An unreadable file in 2026-03-01: a query that reads that partition fails, one that prunes
    // it does not.
    let bad = f.store.path("events/date=2026-03-01/zz.parquet");
    f.store
        .store
        .put(&bad, bytes::Bytes::from_static(b"not parquet").into())
        .await
        .unwrap();
    let engine = QueryEngine::new(f.store.clone(), Default::default(), QueryLimits::default());
    match engine.sql("SELECT count(*) FROM events").await {
        Err(QueryError::Failed(m)) => {
            assert!(m.contains("events/date=2026-03-01/zz.parquet"), "{m}")
        }
        other => panic!("{:?}", other.map(|r| r.rows())),
    }
    let r = engine
        .sql("SELECT count(*) AS n FROM events WHERE date = '2026-03-02'")
        .await
        .unwrap();
    assert_eq!(text(&r, Format::Json), "{\"n\":1}\n");
}

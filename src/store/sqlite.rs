pub struct SqliteStore;
impl SqliteStore { pub fn open(_p: &std::path::Path) -> super::StoreResult<SqliteStore> { Err(super::StoreError("stub".into())) } }
#[async_trait::async_trait]
impl super::Store for SqliteStore {
    async fn insert(&self, _r: super::NewRequest) -> super::StoreResult<super::Inserted> { todo!() }
    async fn get(&self, _id: &str) -> super::StoreResult<Option<super::RequestRecord>> { todo!() }
    async fn list(&self, _q: &super::ListQuery) -> super::StoreResult<Vec<super::RequestRecord>> { todo!() }
    async fn start_attempt(&self, _id: &str, _n: i64) -> super::StoreResult<Option<u32>> { todo!() }
    async fn record_progress(&self, _id: &str, _p: &super::Progress) -> super::StoreResult<()> { todo!() }
    async fn finish(&self, _id: &str, _o: &super::Outcome, _n: i64, _d: Option<super::NewDelivery>) -> super::StoreResult<bool> { todo!() }
    async fn unfinished(&self) -> super::StoreResult<Vec<super::RequestRecord>> { todo!() }
    async fn purge_finished_before(&self, _c: i64) -> super::StoreResult<u64> { todo!() }
    async fn recent_durations(&self, _f: &str, _a: &str, _l: usize) -> super::StoreResult<Vec<i64>> { todo!() }
    async fn session_turns(&self, _f: &str, _u: &str, _s: &str, _l: usize) -> super::StoreResult<Vec<(String, String)>> { todo!() }
    async fn due_deliveries(&self, _n: i64, _l: usize) -> super::StoreResult<Vec<super::Delivery>> { todo!() }
    async fn record_delivery(&self, _id: &str, _u: &super::DeliveryUpdate) -> super::StoreResult<()> { todo!() }
}

"""A seeded stress of the vendored SQLite's append split (vendor/README.md),
run by scripts/sqlite-split-stress.sh through Python's sqlite3 module with the
vendored sqlite3.c loaded in place of the system's: appends in the middle and
at the end of indexes, keys at random, keys big enough to spill to overflow
pages, a WITHOUT ROWID table, deletes, commits of 1 to 200 statements;
`PRAGMA integrity_check` every 300 commits, then every row compared with a
model kept in memory and read back in order through two indexes.

    python3 sqlite_split_stress.py SEED DIR
"""
import sqlite3, os, random, sys
seed=int(sys.argv[1]); random.seed(seed)
path=os.path.join(sys.argv[2], 's%d.db'%seed)
for s in ['', '-wal', '-shm']:
    try: os.remove(path+s)
    except FileNotFoundError: pass
db=sqlite3.connect(path, isolation_level=None)
db.executescript("""PRAGMA journal_mode=WAL; PRAGMA page_size=4096;
CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT, c BLOB);
CREATE INDEX t_a ON t (a); CREATE INDEX t_b ON t (b, id); CREATE INDEX t_c ON t (c);
CREATE TABLE w (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;""")
model={}; wmodel={}
n=0
for commit in range(1500):
    db.execute('BEGIN')
    for _ in range(random.choice([1,8,24,64,200])):
        r=random.random(); n+=1
        if r<0.45:
            grp=random.randrange(50)
            a='g%03d-%010d'%(grp,n)            # appends per group (middle of index)
            b=('z'*random.choice([1,300,1500]))+'%010d'%n  # appends at end, some huge (overflow cells)
            c=os.urandom(random.choice([8,100,2500]))       # random, some huge
            db.execute('INSERT INTO t VALUES (?,?,?,?)',(n,a,b,c)); model[n]=(a,b,c)
        elif r<0.6 and model:
            k=random.choice(list(model)) if len(model)<5000 else random.randrange(n)
            if k in model: db.execute('DELETE FROM t WHERE id=?',(k,)); del model[k]
        elif r<0.9:
            k=('%012d'%n) if random.random()<0.7 else os.urandom(8).hex()
            v='v'*random.choice([1,50,3000])
            db.execute('INSERT OR REPLACE INTO w VALUES (?,?)',(k,v)); wmodel[k]=v
        elif wmodel:
            k=random.choice(list(wmodel)) if len(wmodel)<5000 else None
            if k: db.execute('DELETE FROM w WHERE k=?',(k,)); del wmodel[k]
    db.execute('COMMIT')
    if commit%300==299:
        assert db.execute('PRAGMA integrity_check').fetchone()[0]=='ok', commit
db.close()
db=sqlite3.connect(path)
assert db.execute('PRAGMA integrity_check').fetchone()[0]=='ok'
got={r[0]:(r[1],r[2],r[3]) for r in db.execute('SELECT id,a,b,c FROM t')}
assert got==model
assert [r[0] for r in db.execute('SELECT a FROM t INDEXED BY t_a ORDER BY a')]==sorted(v[0] for v in model.values())
assert [r[0] for r in db.execute('SELECT c FROM t INDEXED BY t_c ORDER BY c')]==sorted(v[2] for v in model.values())
assert dict(db.execute('SELECT k,v FROM w'))==wmodel
print('seed', seed, 'ok', len(model), len(wmodel), os.path.getsize(path)//4096, 'pages')

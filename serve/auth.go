package serve

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/policy"
)

// TokenPrefix starts every access token.
const TokenPrefix = "umbra_tok_"

// TokenEntry is one administrator-issued token in the tokens file: never the token,
// only its SHA-256.
type TokenEntry struct {
	Principal string   `json:"principal"` // the policy principal id, "token:NAME"
	Groups    []string `json:"groups"`
	SHA256    string   `json:"sha256"` // hex SHA-256 of the token string
}

// TokensFile is the tokens file's content.
type TokensFile struct {
	Tokens []TokenEntry `json:"tokens"`
}

// NewToken returns a fresh token and its entry for principal "token:"+name.
func NewToken(name string, groups []string) (string, TokenEntry, error) {
	if !validName(name) {
		return "", TokenEntry{}, fmt.Errorf("token name %q: use 1-64 of a-z, 0-9, '-', '_', '.'", name)
	}
	for _, g := range groups {
		if !validName(g) {
			return "", TokenEntry{}, fmt.Errorf("group %q: use 1-64 of a-z, 0-9, '-', '_', '.'", g)
		}
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", TokenEntry{}, err
	}
	tok := TokenPrefix + base64.RawURLEncoding.EncodeToString(b)
	sum := sha256.Sum256([]byte(tok))
	return tok, TokenEntry{Principal: "token:" + name, Groups: append([]string{}, groups...), SHA256: hex.EncodeToString(sum[:])}, nil
}

func validName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// LoadTokens reads and validates a tokens file (at most 1 MiB, strict JSON).
func LoadTokens(path string) (*Tokens, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	if len(b) > 1<<20 {
		return nil, fmt.Errorf("tokens file %s is over 1 MiB", path)
	}
	return ParseTokens(b)
}

// ParseTokens validates a tokens file's content.
func ParseTokens(b []byte) (*Tokens, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f TokensFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	if dec.More() {
		return nil, errors.New("tokens file: data after the JSON object")
	}
	t := &Tokens{byHash: map[[32]byte]policy.Principal{}}
	for i, e := range f.Tokens {
		name, ok := strings.CutPrefix(e.Principal, "token:")
		h, err := hex.DecodeString(e.SHA256)
		if !ok || !validName(name) || err != nil || len(h) != 32 {
			return nil, fmt.Errorf("tokens file: entry %d: want principal \"token:NAME\" and a 64-digit hex sha256", i+1)
		}
		groups := []string{}
		for _, g := range e.Groups {
			if !validName(g) {
				return nil, fmt.Errorf("tokens file: entry %d: bad group %q", i+1, g)
			}
			groups = append(groups, g)
		}
		var k [32]byte
		copy(k[:], h)
		t.byHash[k] = policy.Principal{ID: e.Principal, Groups: groups, Auth: "token"}
	}
	return t, nil
}

// Tokens maps token hashes to principals.
type Tokens struct {
	byHash map[[32]byte]policy.Principal
}

// Lookup returns the principal of a presented token. The lookup is by hash, so its
// timing says nothing about the tokens' values.
func (t *Tokens) Lookup(tok string) (policy.Principal, bool) {
	if t == nil || !strings.HasPrefix(tok, TokenPrefix) || len(tok) > 128 {
		return policy.Principal{}, false
	}
	p, ok := t.byHash[sha256.Sum256([]byte(tok))]
	return p, ok
}

// sessions are the browser logins: a random cookie value (kept as its hash) maps to
// a principal and a CSRF token, for sessionTTL.
type sessions struct {
	mu sync.Mutex
	m  map[[32]byte]*session
}

type session struct {
	p       policy.Principal
	csrf    string
	expires time.Time
}

const sessionTTL = 8 * time.Hour

func randString(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func (s *sessions) create(p policy.Principal) (cookie string, sess *session) {
	cookie = randString(32)
	sess = &session{p: p, csrf: randString(32), expires: time.Now().Add(sessionTTL)}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for k, v := range s.m {
		if now.After(v.expires) {
			delete(s.m, k)
		}
	}
	s.m[sha256.Sum256([]byte(cookie))] = sess
	return cookie, sess
}

func (s *sessions) get(cookie string) (*session, bool) {
	if len(cookie) > 128 {
		return nil, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[sha256.Sum256([]byte(cookie))]
	if !ok || time.Now().After(v.expires) {
		return nil, false
	}
	return v, true
}

func (s *sessions) drop(cookie string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, sha256.Sum256([]byte(cookie)))
}

func csrfOK(sess *session, got string) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(sess.csrf), []byte(got)) == 1
}

#!/usr/bin/env python3
"""Usage: scripts/conformance/cluster_gen.py > crates/trellis-policy/conformance/cluster.yaml

(see the docstring below)."""
import json, os, re, subprocess
# A clone of kubernetes-sigs/network-policy-api at commit 0eec1b0.
REPO=os.environ.get('NPAPI_REPO', '/work/.mirror/kubernetes-sigs+network-policy-api/repo')
def show(p): return subprocess.run(['git','-C',REPO,'show','HEAD:'+p],capture_output=True,text=True,check=True).stdout
def pokes(path):
    src=show(path)
    runs=[]; vars={}
    for line in src.split('\n'):
        m=re.search(r't\.Run\("([^"]+)"',line)
        if m: runs.append({'name':m.group(1),'pokes':[]}); continue
        m=re.search(r'(\w+) :?= kubernetes\.GetPod\(t, s\.Client, "network-policy-conformance-([\w-]+)", "([\w-]+)"',line)
        if m: vars[m.group(1)]=(m.group(2),m.group(3)); continue
    # pokes span two lines; join
    joined=re.sub(r',\s*\n\s*',', ',src)
    runs2=[]; vars={}
    for line in joined.split('\n'):
        m=re.search(r't\.Run\("([^"]+)"',line)
        if m: runs2.append({'name':m.group(1),'pokes':[]}); continue
        m=re.search(r'(\w+) :?= kubernetes\.GetPod\(t, s\.Client, "network-policy-conformance-([\w-]+)", "([\w-]+)"',line)
        if m: vars[m.group(1)]=(m.group(2),m.group(3)); continue
        m=re.search(r'PokeServer\(t, s\.ClientSet, &s\.KubeConfig, "network-policy-conformance-([\w-]+)", "([\w-]+)", "(\w+)", (\w+)\.Status\.PodIP, int32\((\d+)\), s\.TimeoutConfig, (true|false)\)',line)
        if m:
            runs2[-1]['pokes'].append({'from':(m.group(1),m.group(2)),'proto':m.group(3),'to':vars[m.group(4)],'port':int(m.group(5)),'want':m.group(6)=='true'})
    return runs2
"""Generates crates/trellis-policy/conformance/cluster.yaml from kubernetes-sigs/network-policy-api
conformance/{base,tests}: policies mapped onto the shared model, steps = the t.Run subtests with
their (cumulative) mutations, full truth tables from an independent oracle of the API's semantics,
and every upstream PokeServer assertion checked against that oracle."""
import copy, ipaddress, json, re, sys
import yaml


HOUSE = {'gryffindor': 'x', 'slytherin': 'y', 'hufflepuff': 'z', 'ravenclaw': 'w'}
POD = {'harry-potter': 'x', 'draco-malfoy': 'y', 'cedric-diggory': 'z', 'luna-lovegood': 'w'}
NSS = ['x', 'y', 'z', 'w']
PODS = ['a', 'b']
PORTMAP = {('tcp', 80): 80, ('tcp', 8080): 81, ('udp', 53): 80, ('udp', 5353): 81,
           ('sctp', 9003): 80, ('sctp', 9005): 81}
# Stand-in addresses for the oracle (the lab's differ; only $(cidr ...) placeholders use them).
ADDR = {(ns, p): f'10.9.{i}.{j+1}' for i, ns in enumerate(NSS) for j, p in enumerate(PODS)}

def pod_of(up):  # ('gryffindor', 'harry-potter-0') -> ('x', 'a')
    ns, name = up
    base, idx = name.rsplit('-', 1)
    assert POD[base] == HOUSE[ns]
    return (HOUSE[ns], PODS[int(idx)])

def map_selector(sel, kind):
    """A label selector of upstream's model in ours. kind: 'ns' or 'pod'."""
    if sel is None:
        return {}
    out = {}
    ml = dict(sel.get('matchLabels') or {})
    exprs = list(sel.get('matchExpressions') or [])
    new_ml = {}
    for k, v in ml.items():
        if k == 'kubernetes.io/metadata.name':
            new_ml[k] = HOUSE[v.replace('network-policy-conformance-', '')]
        elif k == 'conformance-house' and kind == 'ns':
            new_ml['ns'] = HOUSE[v]
        elif k == 'conformance-house' and kind == 'pod':
            # Every pod of a house carries its house's label: every pod of the model's
            # namespace carries `pod`.
            exprs.append({'key': 'pod', 'operator': 'Exists'})
        else:
            raise SystemExit(f'unmapped label {k}')
    assert not (sel.get('matchExpressions')), sel
    if new_ml:
        out['matchLabels'] = new_ml
    if exprs:
        out['matchExpressions'] = exprs
    return out

def map_nspod(p):
    return {'namespaceSelector': map_selector(p.get('namespaceSelector'), 'ns'),
            'podSelector': map_selector(p.get('podSelector'), 'pod')}

def map_peer(peer):
    out = {}
    for k, v in peer.items():
        if k == 'namespaces':
            out[k] = map_selector(v, 'ns')
        elif k == 'pods':
            out[k] = map_nspod(v)
        elif k == 'networks':
            out[k] = list(v)
        else:
            raise SystemExit(f'unmapped peer {k}')
    return out

def map_protocols(ps):
    out = []
    for p in ps:
        [(proto, body)] = p.items()
        port = body['destinationPort']['number']
        out.append({proto: {'destinationPort': {'number': PORTMAP[(proto, port)]}}})
    return out

def map_rule(r, peers_key):
    out = {}
    if 'name' in r:
        out['name'] = r['name']
    out['action'] = r['action']
    out[peers_key] = [map_peer(p) for p in r[peers_key]]
    if r.get('protocols'):
        out['protocols'] = map_protocols(r['protocols'])
    return out

def map_doc(d):
    d = copy.deepcopy(d)
    if d['kind'] == 'ClusterNetworkPolicy':
        s = d['spec']
        subj = s['subject']
        if 'namespaces' in subj:
            s['subject'] = {'namespaces': map_selector(subj['namespaces'], 'ns')}
        else:
            s['subject'] = {'pods': map_nspod(subj['pods'])}
        if 'ingress' in s:
            s['ingress'] = [map_rule(r, 'from') for r in s['ingress']]
        if 'egress' in s:
            s['egress'] = [map_rule(r, 'to') for r in s['egress']]
        return d
    assert d['kind'] == 'NetworkPolicy'
    d['metadata']['namespace'] = HOUSE[d['metadata']['namespace'].replace('network-policy-conformance-', '')]
    s = d['spec']
    s['podSelector'] = map_selector(s.get('podSelector'), 'pod') if s.get('podSelector') else {}
    for dirn, key in (('ingress', 'from'), ('egress', 'to')):
        for r in s.get(dirn) or []:
            r[key] = [{'namespaceSelector': map_selector(p['namespaceSelector'], 'ns')} for p in r[key]]
    return d

# ---------------------------------------------------------------- the oracle
def sel_matches(sel, labels):
    for k, v in (sel.get('matchLabels') or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get('matchExpressions') or []:
        has = e['key'] in labels
        op = e['operator']
        if op == 'Exists' and not has: return False
        if op == 'DoesNotExist' and has: return False
        if op == 'In' and labels.get(e['key']) not in e['values']: return False
        if op == 'NotIn' and labels.get(e['key']) in e['values']: return False
    return True

class World:
    def __init__(self):
        self.ns_labels = {ns: {'ns': ns} for ns in NSS}
        self.docs = {}  # (kind, ns, name) -> doc
    def nsl(self, ns):
        l = dict(self.ns_labels[ns]); l['kubernetes.io/metadata.name'] = ns; return l
    def podl(self, pod):
        return {'pod': pod[1]}

def peer_matches(w, peer, pod):
    if not peer:
        return None  # fails closed
    if 'namespaces' in peer:
        return sel_matches(peer['namespaces'], w.nsl(pod[0]))
    if 'pods' in peer:
        return sel_matches(peer['pods']['namespaceSelector'], w.nsl(pod[0])) and \
            sel_matches(peer['pods']['podSelector'], w.podl(pod))
    if 'networks' in peer:
        a = ipaddress.ip_address(ADDR[pod])
        nets = [ipaddress.ip_network(resolve_cidr(n)) for n in peer['networks']]
        return any(a in n for n in nets if n.version == 4)
    raise SystemExit(peer)

def proto_matches(protocols, proto, port):
    if not protocols:
        return True
    for p in protocols:
        [(pr, body)] = p.items()
        if pr == proto and body['destinationPort']['number'] == port:
            return True
    return False

def subject_has(w, s, pod):
    subj = s['subject']
    if 'namespaces' in subj:
        return sel_matches(subj['namespaces'], w.nsl(pod[0]))
    return sel_matches(subj['pods']['namespaceSelector'], w.nsl(pod[0])) and \
        sel_matches(subj['pods']['podSelector'], w.podl(pod))

def tier_verdict(w, tier, direction, me, peer_pod, proto, port):
    """'allow', 'deny', 'pass' or None for the ClusterNetworkPolicies of a tier."""
    cnps = [d for d in w.docs.values() if d['kind'] == 'ClusterNetworkPolicy' and d['spec']['tier'] == tier]
    cnps.sort(key=lambda d: (d['spec']['priority'], d['metadata']['name']))
    key = 'from' if direction == 'ingress' else 'to'
    for d in cnps:
        s = d['spec']
        if not subject_has(w, s, me):
            continue
        for r in s.get(direction) or []:
            if not proto_matches(r.get('protocols'), proto, port):
                continue
            if any(peer_matches(w, p, peer_pod) for p in r[key]):
                return {'Accept': 'allow', 'Deny': 'deny', 'Pass': 'pass'}[r['action']]
    return None

def np_verdict(w, direction, me, peer_pod, proto, port):
    nps = [d for d in w.docs.values() if d['kind'] == 'NetworkPolicy' and d['metadata']['namespace'] == me[0]]
    selecting = []
    for d in nps:
        s = d['spec']
        types = s.get('policyTypes') or (['Ingress'] + (['Egress'] if s.get('egress') else []))
        if direction.capitalize() in types and sel_matches(s.get('podSelector') or {}, w.podl(me)):
            selecting.append(s)
    if not selecting:
        return None
    key = 'from' if direction == 'ingress' else 'to'
    for s in selecting:
        for r in s.get(direction) or []:
            assert not r.get('ports')
            for p in r[key]:
                if sel_matches(p['namespaceSelector'], w.nsl(peer_pod[0])):
                    return 'allow'
    return 'deny'

def direction_allowed(w, direction, me, peer_pod, proto, port):
    v = tier_verdict(w, 'Admin', direction, me, peer_pod, proto, port)
    if v in ('allow', 'deny'):
        return v == 'allow'
    v = np_verdict(w, direction, me, peer_pod, proto, port)
    if v:
        return v == 'allow'
    v = tier_verdict(w, 'Baseline', direction, me, peer_pod, proto, port)
    assert v != 'pass'
    if v:
        return v == 'allow'
    return True

def reach(w, src, dst, proto, port):
    return direction_allowed(w, 'egress', src, dst, proto, port) and \
        direction_allowed(w, 'ingress', dst, src, proto, port)

ALL = [(ns, p) for ns in NSS for p in PODS]

def table(w, proto, port):
    return {(s, d): reach(w, s, d, proto, port) for s in ALL for d in ALL if s != d}

def expectation(t):
    vals = list(t.values())
    default = vals.count(True) >= vals.count(False)
    peers = []
    for fns in NSS:
        for tns in NSS:
            cells = {k: v for k, v in t.items() if k[0][0] == fns and k[1][0] == tns}
            if all(v != default for v in cells.values()):
                peers.append({'from': {'namespace': fns}, 'to': {'namespace': tns}, 'reach': not default})
                continue
            for (s, d), v in sorted(cells.items()):
                if v != default:
                    peers.append({'from': {'namespace': s[0], 'pod': s[1]}, 'to': {'namespace': d[0], 'pod': d[1]}, 'reach': v})
    return {'default': default, 'peers': peers}

# ---------------------------------------------------------------- the cases
UPSTREAM = 'kubernetes-sigs/network-policy-api@0eec1b0'

def runs_with_mutations(test_path):
    """Each t.Run: its name, its pokes, and its policy mutations in source order."""
    src = show(test_path)
    out = []
    cur_policy = None
    for line in src.split('\n'):
        m = re.search(r't\.Run\("([^"]+)"', line)
        if m:
            out.append({'name': m.group(1), 'muts': []})
            continue
        m = re.search(r'GetClusterNetworkPolicy\(t, s\.Client, "([\w-]+)"', line)
        if m:
            cur_policy = m.group(1)
        m = re.search(r'mutate\.Spec\.(Egress|Ingress)\[(\d)\] = mutate\.Spec\.(Egress|Ingress)\[(\d)\]', line)
        if m:
            out[-1]['muts'].append(('swap', cur_policy, m.group(1).lower(), int(m.group(2)), int(m.group(4))))
        m = re.search(r'mutate\.Spec\.(Egress|Ingress)\[(\d)\]\.Action = api\.ClusterNetworkPolicyRuleAction(\w+)', line)
        if m:
            out[-1]['muts'].append(('action', cur_policy, m.group(1).lower(), int(m.group(2)), m.group(3)))
        m = re.search(r'mutate\.Spec\.Priority = (\d+)', line)
        if m:
            out[-1]['muts'].append(('priority', cur_policy, int(m.group(1))))
        if 'append(newRule' in line:
            out[-1]['muts'].append(('insert-cidr', cur_policy))
        if 'SetLabels' in line:
            m = re.search(r'"conformance-house": "([\w-]+)"', line)
            out[-1]['muts'].append(('nslabel', 'y', m.group(1)))
        if 'Delete(ctx, np)' in line:
            out[-1]['muts'].append(('delete-np',))
    pk = pokes(test_path)
    assert [r['name'] for r in pk] == [r['name'] for r in out]
    for r, p in zip(out, pk):
        r['pokes'] = p['pokes']
    return out

def doc_key(d):
    return (d['kind'], d['metadata'].get('namespace'), d['metadata']['name'])

def cidr(ns_pod):
    return f'$(cidr {ns_pod[0]}/{ns_pod[1]})'

def resolve_cidr(text):
    m = re.fullmatch(r'\$\(cidr (\w)/(\w)\)', text)
    return ADDR[(m.group(1), m.group(2))] + '/32' if m else text

def apply_mut(w, mut, changed):
    kind = mut[0]
    if kind in ('swap', 'action', 'priority', 'insert-cidr'):
        key = ('ClusterNetworkPolicy', None, mut[1])
        s = w.docs[key]['spec']
        if kind == 'swap':
            _, _, d, i, j = mut
            # Go's three-line swap: only `Spec.X[i] = Spec.X[j]` names both indexes.
            s[d][i], s[d][j] = s[d][j], s[d][i]
        elif kind == 'action':
            s[mut[2]][mut[3]]['action'] = mut[4]
        elif kind == 'priority':
            s['priority'] = mut[2]
        else:
            rule = {'name': 'allow-egress-to-specific-podIPs', 'action': 'Accept',
                    'to': [{'networks': [cidr(('w', 'a')), cidr(('z', 'a'))]}]}
            s['egress'].insert(0, rule)
        changed.setdefault('apply', []).append(key)
    elif kind == 'nslabel':
        ns = mut[1]
        w.ns_labels[ns] = {'ns': HOUSE.get(mut[2], mut[2])}
        changed.setdefault('labels', []).append(ns)
    elif kind == 'delete-np':
        [key] = [k for k in w.docs if k[0] == 'NetworkPolicy']
        changed.setdefault('delete', []).append(copy.deepcopy(w.docs.pop(key)))

FILES = [
    # (test file, manifest, protocols probed)
    ('admin-network-policy-standard-egress-tcp-rules.go', ['tcp']),
    ('admin-network-policy-standard-egress-udp-rules.go', ['udp']),
    ('admin-network-policy-standard-egress-sctp-rules.go', ['sctp']),
    ('admin-network-policy-standard-ingress-tcp-rules.go', ['tcp']),
    ('admin-network-policy-standard-ingress-udp-rules.go', ['udp']),
    ('admin-network-policy-standard-ingress-sctp-rules.go', ['sctp']),
    ('admin-network-policy-standard-gress-rules.go', ['tcp', 'udp', 'sctp']),
    ('admin-network-policy-standard-egress-inline-cidr-rules.go', ['tcp', 'udp', 'sctp']),
    ('admin-network-policy-standard-priority.go', ['tcp']),
    ('admin-network-policy-standard-integration.go', ['tcp']),
    ('baseline-admin-network-policy-standard-egress-tcp-rules.go', ['tcp']),
    ('baseline-admin-network-policy-standard-egress-udp-rules.go', ['udp']),
    ('baseline-admin-network-policy-standard-egress-sctp-rules.go', ['sctp']),
    ('baseline-admin-network-policy-standard-ingress-tcp-rules.go', ['tcp']),
    ('baseline-admin-network-policy-standard-ingress-udp-rules.go', ['udp']),
    ('baseline-admin-network-policy-standard-ingress-sctp-rules.go', ['sctp']),
    ('baseline-admin-network-policy-standard-gress-rules.go', ['tcp', 'udp', 'sctp']),
    ('baseline-admin-network-policy-standard-egress-inline-cidr-rules.go', ['tcp', 'udp', 'sctp']),
]

def manifest_of(test_path):
    m = re.search(r'Manifests: \[\]string\{"([^"]+)"\}', show(test_path))
    return 'conformance/' + m.group(1)

def dump_docs(docs):
    return '---\n'.join(yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=100) for d in docs)

def block(text, indent):
    pad = ' ' * indent
    return '\n'.join(pad + l if l else l for l in text.rstrip('\n').split('\n'))

def flow(v):
    return json.dumps(v, separators=(', ', ': ')).replace('"', '')

def emit_expect(e, indent):
    pad = ' ' * indent
    out = [f'{pad}expect:', f'{pad}  default: {str(e["default"]).lower()}']
    if e['peers']:
        out.append(f'{pad}  peers:')
        for p in e['peers']:
            out.append(f'{pad}  - {{from: {flow(p["from"])}, to: {flow(p["to"])}, reach: {str(p["reach"]).lower()}}}')
    return '\n'.join(out)

def build_case(test, protos):
    path = 'conformance/tests/' + test
    manifest = manifest_of(path)
    base_docs = [map_doc(d) for d in yaml.safe_load_all(show(manifest)) if d]
    runs = runs_with_mutations(path)
    w = World()
    steps = []  # (comment, apply docs, delete docs, labelNamespace, probes{proto: {port: expectation}})
    checked = 0
    for ri, run in enumerate(runs):
        phases = [[]]
        for m in run['muts']:
            if m[0] == 'nslabel':
                phases.append([m])
            else:
                phases[-1].append(m)
        pk = run['pokes']
        n_after = 3 * (len(phases) - 1)
        groups = [pk[:len(pk) - n_after]] + [pk[len(pk) - n_after + 3 * i:len(pk) - n_after + 3 * (i + 1)] for i in range(len(phases) - 1)]
        for phase, group in zip(phases, groups):
            changed = {}
            apply_docs = []
            if ri == 0 and not steps:
                for d in base_docs:
                    w.docs[doc_key(d)] = copy.deepcopy(d)
                apply_docs = copy.deepcopy(base_docs)
            for m in phase:
                apply_mut(w, m, changed)
            for key in dict.fromkeys(changed.get('apply', [])):
                apply_docs = apply_docs + [copy.deepcopy(w.docs[key])]
            tables = {}
            for proto in protos:
                for port in (80, 81):
                    tables[(proto, port)] = table(w, proto, port)
            for p in group:
                src, dst = pod_of(p['from']), pod_of(p['to'])
                port = PORTMAP[(p['proto'], p['port'])]
                got = tables[(p['proto'], port)][(src, dst)]
                assert got == p['want'], (test, run['name'], p, got)
                checked += 1
            label = [(ns, w.ns_labels[ns]) for ns in changed.get('labels', [])]
            steps.append((run['name'], apply_docs, changed.get('delete', []), label, tables))
    assert checked == sum(len(r['pokes']) for r in runs), test
    return manifest, steps, checked

def emit_case(name, test, manifest, steps, protos, skip):
    out = [f'- name: {name}', f'  source: "{UPSTREAM} {("conformance/tests/" + test)} (policies: {manifest})"']
    if skip:
        out.append(f'  skip: "{skip}"')
    out.append('  steps:')
    for comment, apply_docs, delete_docs, labels, tables in steps:
        out.append(f'  # t.Run("{comment}")')
        first = True
        def key(k):
            nonlocal first
            p = '  - ' if first else '    '
            first = False
            return p + k
        if delete_docs:
            out.append(key('delete: |'))
            out.append(block(dump_docs(delete_docs), 6))
        if apply_docs:
            out.append(key('apply: |'))
            out.append(block(dump_docs(apply_docs), 6))
        for ns, l in labels:
            out.append(key(f'labelNamespace: {{name: {ns}, labels: {flow(l)}}}'))
        out.append(key('probes:'))
        for (proto, port), t in tables.items():
            if proto not in protos:
                continue
            out.append(f'    - port: {port}')
            out.append(f'      protocol: {proto.upper()}')
            out.append(emit_expect(expectation(t), 6))
    return '\n'.join(out)

SCTP_SKIP = 'SCTP: this kernel has no SCTP; checked against the evaluator only'

def main():
    cases = []
    total = 0
    for test, protos in FILES:
        manifest, steps, checked = build_case(test, protos)
        total += checked
        stem = test[:-3]
        live = [p for p in protos if p != 'sctp']
        if live:
            cases.append(emit_case(stem, test, manifest, steps, live, None))
        if 'sctp' in protos:
            nm = stem if not live else stem + ' (SCTP)'
            cases.append(emit_case(nm, test, manifest, steps, ['sctp'], SCTP_SKIP))
    header = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cluster_header.yaml')).read()
    sys.stdout.write(header + '\n'.join(cases) + '\n')
    print(f'{total} upstream assertions checked', file=sys.stderr)

main()

#!/usr/bin/env python3
"""kmock==0.8 KubernetesEmulator as a standalone process for non-Python (Rust) tests.

Usage: kmock_server.py [PORT]  (0/absent = random). Prints "PORT <n>", serves 127.0.0.1 until killed.
Side endpoint: GET /_kmock/requests -> JSON list of every request received (in order).
Storage, GET/LIST/WATCH/DELETE, merge/json PATCH and watch events are kmock's own; the shims
below only fill 7 gaps of kmock 0.8 (marked "Gap N").
"""
import asyncio, datetime, sys, uuid
import kmock

RESOURCES = {'v1/pods': 'Pod', 'v1/persistentvolumeclaims': 'PersistentVolumeClaim',
             'v1/secrets': 'Secret', 'v1/configmaps': 'ConfigMap', 'v1/services': 'Service'}
VERBS = {'create', 'delete', 'get', 'list', 'patch', 'watch'}
REASONS = {404: 'NotFound', 409: 'AlreadyExists'}  # what kube-rs Status::is_not_found() etc. match

def _hdr(request, name):
    return next((v for k, v in request.headers.items() if k.lower() == name), '')

def _selector_ok(obj, selector):
    # Equality-based labelSelector only: k=v, k==v, k!=v, k, !k (comma = AND); no in/notin.
    labels = (obj.get('metadata') or {}).get('labels') or {}
    for term in filter(None, (t.strip() for t in (selector or '').split(','))):
        if '!=' in term:
            k, v = term.split('!=', 1); ok = labels.get(k.strip()) != v.strip()
        elif '=' in term:
            k, v = term.replace('==', '=').split('=', 1); ok = labels.get(k.strip()) == v.strip()
        else:
            ok = (term[1:].strip() not in labels) if term.startswith('!') else (term in labels)
        if not ok:
            return False
    return True

class Emulator(kmock.KubernetesEmulator):
    async def _handle(self, request):
        data, action = request.data, request.action
        if request.resource is not None and isinstance(data, dict) and action in (kmock.action.CREATE, kmock.action.UPDATE):
            # Gap 1: stamp metadata.namespace from the URL, else namespaced watches drop the events.
            if request.namespace:
                data.setdefault('metadata', {}).setdefault('namespace', request.namespace)
            # Gap 6: kmock assigns no uid; clients tell Pods of one name apart by it.
            meta = data.setdefault('metadata', {})
            key = (request.resource, request.namespace, request.name or meta.get('name'))
            if key not in self.objects or self.objects[key].deleted:
                meta.setdefault('uid', str(uuid.uuid4()))
                meta.setdefault('creationTimestamp',
                                datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'))
            # Gap 7: kmock keeps no resourceVersion; watch clients resume from the last one seen.
            self._rv = getattr(self, '_rv', 0) + 1
            meta['resourceVersion'] = str(self._rv)
            # Gap 2: server-side apply (apply-patch+yaml) of a missing object = create; kmock 404s.
            key = (request.resource, request.namespace, request.name)
            if action == kmock.action.UPDATE and _hdr(request, 'content-type').startswith('application/apply-patch') \
                    and (key not in self.objects or self.objects[key].deleted):
                object.__setattr__(request, 'action', kmock.action.CREATE)
        return await super()._handle(request)

    # Gap 5: kmock's reasons ('Object Not Found') are not K8s reasons; kube-rs get_opt() needs 'NotFound'.
    async def _render_error(self, exc):
        if isinstance(exc, kmock.KubernetesError) and exc.status in REASONS:
            exc = kmock.KubernetesError(status=exc.status, reason=REASONS[exc.status], message=exc.message)
        return await super()._render_error(exc)

    # Gap 3: kmock ignores ?labelSelector= on LIST and WATCH; filter kmock's own results.
    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        result['items'] = [o for o in result['items'] if _selector_ok(o, request.params.get('labelSelector'))]
        return result

    async def _serve_watch(self, request):
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or _selector_ok(event.get('object') or {}, request.params.get('labelSelector')):
                yield event

def _request_log(emu):
    return [{'id': r.id, 'method': r.method.value, 'path': r.url.path, 'query': dict(r.params),
             'content_type': _hdr(r, 'content-type'), 'headers': dict(r.headers), 'body': r.text}
            for r in emu._requests if not r.url.path.startswith('/_kmock/')]

async def main(port):
    async with Emulator() as emu, kmock.Server(emu, port=port or None) as server:
        for res, kind in RESOURCES.items():  # Gap 4: LIST 404s for a resource with no objects yet.
            emu.resources[res] = {'kind': kind, 'namespaced': True, 'verbs': VERBS}
        emu['get /_kmock/requests'] << (lambda: _request_log(emu))
        print('PORT', server.port, flush=True)
        await asyncio.Event().wait()

if __name__ == '__main__':
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))

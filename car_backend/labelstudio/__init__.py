"""Everything that knows Label Studio's formats and API.

Owns: label config parsing (config), media fetching (media), results and regions written into Label
Studio (results) and read back into masks (regions), interactive contexts (interactive), and the REST
client with its authentication (client). Takes its access settings as any object with the fields of
`access.Access` (the service's Settings is one).
May import: engine (result types and errors). Never settings, Redis or anything above.
"""
